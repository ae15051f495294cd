"""Explanation methods by family; each public name is re-exported from cnnviz_fast."""
