"""Ingestion: stage the raw Task07 data (synthetic phantoms or MSD), validate it, build the manifest."""

from pancreas_seg.pipelines.ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
