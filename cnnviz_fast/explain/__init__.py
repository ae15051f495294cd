"""Explanation methods, one module per family (re-exported from cnnviz_fast)."""
