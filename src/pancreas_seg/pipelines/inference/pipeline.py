"""Inference wiring: find the scans -> load the predictor -> segment -> write overlays and DICOM-SEG ->
report. The masks, overlays and DICOM-SEG files are partitioned datasets in ``inference.output_dir``."""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.pipelines.inference import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.find_scans, "params:inference", ["inference_scans", "inference_skipped"], name="find_scans"),
        Node(nodes.load_predictor, ["params:inference", "inference_scans"], "inference_predictor",
             name="load_predictor"),
        Node(nodes.segment_scans, ["inference_predictor", "inference_scans", "params:inference"], "inference_masks",
             name="segment_scans"),
        Node(nodes.plot_overlays, ["inference_masks", "inference_scans", "inference_predictor", "params:inference"],
             "inference_overlays", name="plot_overlays"),
        Node(nodes.make_dicom_segs, ["inference_masks", "inference_scans", "inference_predictor", "params:inference"],
             "inference_dicom_seg", name="make_dicom_segs"),
        Node(nodes.report_inference,
             ["inference_masks", "inference_overlays", "inference_dicom_seg", "inference_scans", "inference_skipped",
              "inference_predictor", "params:inference"],
             "inference_report", name="report_inference"),
    ])
