"""The data stage: ImageFolder -> WebDataset shards -> streaming loaders -> device batches.

* :mod:`gpd_ds.data.shards`: the shard writer and the dataset index (``gpd-ds make-shards``);
* :mod:`gpd_ds.data.loader`: shard resolution, the train loader (split, equal batches, resumable) and the exact
  eval loader;
* :mod:`gpd_ds.data.transforms`: timm transforms in the workers, normalisation/erasing/mixup on the device;
* :mod:`gpd_ds.data.demo`: the offline demo dataset.

Submodules are imported explicitly (the shard writer does not need torch or timm).
"""
