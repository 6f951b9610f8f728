"""Importers that fill the catalog with products.

* :mod:`.catalog_file` — a shop's own catalog from CSV or JSON Lines (``styletag import catalog``), through
  ``catalog.products.upsert_products``;
* :mod:`.fashion_mnist` — Fashion-MNIST as 28 px products with ground truth (``import fashion-mnist``);
* :mod:`.photos` — Fashion-MNIST rendered as colour product photos, written to the store with a CSV that
  ``import catalog`` takes (``import fashion-mnist --render photo``).

None of them imports torch.
"""

from catalog.importers.fashion_mnist import (
    FORMATS,
    TAXONOMY,
    ImportReport,
    encode_image,
    import_fashion_mnist,
)

__all__ = ["FORMATS", "TAXONOMY", "ImportReport", "encode_image", "import_fashion_mnist"]
