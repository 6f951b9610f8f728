"""The SQL product catalog, object storage for product images, importers and storefront queries.

This package never imports torch: the storefront and the producer load it cheaply.
"""
