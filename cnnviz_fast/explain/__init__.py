"""Explanation methods by family; each public one is re-exported from cnnviz_fast."""
