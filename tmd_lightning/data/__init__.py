"""Data: manifests, video backends, the DataModule, precomputed caches and the toy world generator."""

from tmd_lightning.data.backends import AutoBackend, DecordBackend, PyAVBackend, VideoDecodeError, get_backend
from tmd_lightning.data.cache import CachedDataModule, CachedLatentDataset, CacheError, collate_cached
from tmd_lightning.data.datamodule import VideoTextDataModule
from tmd_lightning.data.dataset import VideoTextDataset, collate_videos
from tmd_lightning.data.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest
from tmd_lightning.data.toy_world import all_captions, generate_toy_dataset, parse_caption, render, write_mp4

__all__ = [
    "AutoBackend", "CacheError", "CachedDataModule", "CachedLatentDataset", "DecordBackend", "ManifestEntry",
    "ManifestError", "PyAVBackend", "VideoDecodeError", "VideoTextDataModule", "VideoTextDataset", "all_captions",
    "collate_cached", "collate_videos", "generate_toy_dataset", "get_backend", "parse_caption", "read_manifest",
    "render", "write_manifest", "write_mp4",
]
