"""Products: the Python API a shop's sync job and the upload service call, in one place.

* :func:`upsert_products` (``catalog.product_upsert``): the one way in, used by ``styletag import catalog``,
  the upload path and a sync job alike: checked rows, image versions read, idempotent batches.
* :func:`archive_products` / :func:`archive_missing` (``catalog.product_archive``): hide products without
  deleting anything.
* :func:`refresh_image_versions` (``catalog.image_versions``): notice photos replaced behind unchanged URIs.
* :func:`images_for_tagging` / :func:`ids_for_skus` (``catalog.product_reads``): what the worker re-reads.
"""

from catalog.image_versions import ImageCheck, refresh_image_versions
from catalog.product_archive import archive_ids, archive_missing, archive_products, archived_skus, republish
from catalog.product_reads import ProductImage, ids_for_skus, images_for_tagging
from catalog.product_rows import ProductInput, ProductRow, Rejection, RowsRejected
from catalog.product_upsert import UpsertReport, upsert_batch, upsert_products

__all__ = [
    "ImageCheck", "ProductImage", "ProductInput", "ProductRow", "Rejection", "RowsRejected", "UpsertReport",
    "archive_ids", "archive_missing", "archive_products", "archived_skus", "ids_for_skus", "images_for_tagging",
    "refresh_image_versions", "republish", "upsert_batch", "upsert_products",
]
