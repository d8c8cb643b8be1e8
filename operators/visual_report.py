"""The visual report: a summary page and one key image per lesion (matplotlib, Agg), and the DICOM
Encapsulated PDF that carries them to PACS.

Plain functions:
- `report_figures(source_datasets, hu, instance_labels, document)`: [(name, Figure)], the summary
  ("summary") first, then "lesion_<segment number>": the axial slice through the lesion's longest
  diameter in a lung window, whole and zoomed, with the lesion outline, the long axis (solid) and
  the short axis (dashed).
- `encapsulated_pdf(pdf, source_dataset, document)`: the PDF as an Encapsulated PDF instance of the
  source study (pydicom; highdicom has no class for it).

Pixels are drawn as stored (DICOM display convention: patient right on the image left for the
usual axial orientation) with the pixel aspect ratio of PixelSpacing. Every page states that the
network's weights were trained on synthetic lesions and are not for clinical use.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from operators.seg_writer import DEIDENTIFICATION_KEYWORDS, MANUFACTURER, PATIENT_STUDY_KEYWORDS, writer_source

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 903
REPORT_TITLE = "Lung lesions: automatic measurements"
DISCLAIMER = ("Research software, not a medical device: the network weights were trained on synthetic lesions "
              "and are not for clinical use. Check every outline and measurement.")
LUNG_WINDOW = (-600.0, 1500.0)  # level, width (HU)
ZOOM_MIN_MM = 60.0  # the zoomed view spans at least this, and twice the lesion's long axis
PAGE_INCHES = (11.69, 8.27)  # A4 landscape
OUTLINE, LONG_AXIS, SHORT_AXIS = "#ffd21f", "#ff3b3b", "#3bd1ff"
# Titles sit just above their image. Given explicitly, matplotlib does not measure the (hidden) axes on every draw to
# place them there: the same pages, drawn faster.
TITLE_Y = 1.0


def _lung_window(pixels: np.ndarray) -> dict:
    level, width = LUNG_WINDOW
    return {"X": pixels, "cmap": "gray", "vmin": level - width / 2, "vmax": level + width / 2,
            "interpolation": "nearest"}


def _page(title: str) -> Figure:
    figure = Figure(figsize=PAGE_INCHES, dpi=100)
    figure.suptitle(title, fontsize=14, fontweight="bold")
    figure.text(0.5, 0.02, DISCLAIMER, ha="center", fontsize=9, color="#b00000")
    return figure


def _key_image(hu_slice: np.ndarray, mask: np.ndarray, record: dict, pixel_mm: tuple[float, float]) -> Figure:
    location = record["location"]["text"] if record["location"] else "location unknown"
    figure = _page(f"{record['label']}: {location}")
    whole, zoom = figure.subplots(1, 2)
    aspect = pixel_mm[0] / pixel_mm[1]  # between rows over between columns
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    centre = np.array([(rows[0] + rows[-1]) / 2, (columns[0] + columns[-1]) / 2])
    half = np.maximum(ZOOM_MIN_MM, 2 * record["long_axis_mm"]) / 2 / np.asarray(pixel_mm)  # rows, columns
    low, high = centre - half, centre + half
    whole.imshow(**_lung_window(hu_slice), aspect=aspect)
    whole.add_patch(Rectangle((low[1], low[0]), *(high - low)[::-1], fill=False, edgecolor=OUTLINE, linewidth=1))
    whole.set_title(f"axial slice {record['axial_slice_index'] + 1} of the series (feet first), lung window",
                    fontsize=10, y=TITLE_Y)
    box = tuple(slice(max(int(lo), 0), min(int(np.ceil(hi)) + 1, n)) for lo, hi, n in zip(low, high, mask.shape))
    zoom.imshow(**_lung_window(hu_slice[box]), aspect=aspect,
                extent=(box[1].start - 0.5, box[1].stop - 0.5, box[0].stop - 0.5, box[0].start - 0.5))
    zoom.contour(np.arange(box[1].start, box[1].stop), np.arange(box[0].start, box[0].stop),
                 mask[box].astype(np.uint8), levels=[0.5], colors=OUTLINE, linewidths=1.2)
    for key, colour, style in (("long_axis_endpoints_voxel", LONG_AXIS, "-"),
                               ("short_axis_endpoints_voxel", SHORT_AXIS, "--")):
        (_, y0, x0), (_, y1, x1) = record[key]
        zoom.plot([x0, x1], [y0, y1], color=colour, linestyle=style, linewidth=1.5, marker="o", markersize=3)
    zoom.set_title(f"long axis {record['long_axis_mm']:.1f} mm (solid), short axis {record['short_axis_mm']:.1f} mm "
                   f"(dashed)", fontsize=10, y=TITLE_Y)
    for axes in (whole, zoom):
        axes.set_axis_off()
    figure.text(0.5, 0.07, f"volume {record['volume_ml']:.2f} ml, longest 3D diameter "
                f"{record['longest_diameter_3d_mm']:.1f} mm, HU mean {record['mean_hu']:.0f} "
                f"(SD {record['sd_hu']:.0f}, max {record['max_hu']:.0f}), score {record['score']:.2f}",
                ha="center", fontsize=10)
    return figure


def _summary(document: dict, series_description: str) -> Figure:
    figure = _page(REPORT_TITLE)
    burden, records = document["burden"], document["lesions"]
    targets = {t["segment_number"]: t for t in burden["recist_targets"]}
    lines = [f"Series: {series_description}",
             f"Lesions: {burden['lesion_count']}, total volume {burden['total_volume_ml']:.2f} ml",
             f"RECIST 1.1 sum of diameters: {burden['recist_sum_mm']:.1f} mm over {len(targets)} target lesion(s)",
             "(at most 5 targets, at most 2 per organ; hilar and mediastinal lesions are taken as lymph nodes, "
             "measured by their short axis)"]
    figure.text(0.05, 0.88, "\n".join(lines), va="top", fontsize=11, linespacing=1.6)
    if not records:
        figure.text(0.05, 0.6, "No lesion found.", fontsize=12)
        return figure
    header = ["lesion", "location", "long mm", "short mm", "3D mm", "volume ml", "HU mean (SD)", "score", "RECIST"]
    rows = [[r["label"], r["location"]["text"] if r["location"] else "unknown", f"{r['long_axis_mm']:.1f}",
             f"{r['short_axis_mm']:.1f}", f"{r['longest_diameter_3d_mm']:.1f}", f"{r['volume_ml']:.2f}",
             f"{r['mean_hu']:.0f} ({r['sd_hu']:.0f})", f"{r['score']:.2f}",
             f"target ({targets[r['segment_number']]['organ']})" if r["segment_number"] in targets else ""]
            for r in records]
    axes = figure.add_axes((0.05, 0.1, 0.9, 0.58))
    axes.set_axis_off()
    table = axes.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center",
                       colWidths=[0.09, 0.21, 0.08, 0.08, 0.07, 0.09, 0.12, 0.07, 0.14])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    return figure


def report_figures(source_datasets: Sequence[Dataset], hu: np.ndarray, instance_labels: np.ndarray,
                   document: dict) -> list[tuple[str, Figure]]:
    """The summary page and one key image per lesion (module docstring), named for their files."""
    first = source_datasets[0]
    pixel_mm = tuple(float(v) for v in first.PixelSpacing)
    figures = [("summary", _summary(document, str(first.get("SeriesDescription", "")) or "(no description)"))]
    for record in document["lesions"]:
        k = record["axial_slice_index"]
        mask = instance_labels[k] == record["segment_number"]
        figures.append((f"lesion_{record['segment_number']}", _key_image(hu[k], mask, record, pixel_mm)))
    return figures


def encapsulated_pdf(pdf: bytes, source_dataset: Dataset, document: dict) -> Dataset:
    """An Encapsulated PDF instance in the source's patient, study and frame of reference; it lists the
    key slices it shows as its source instances."""
    now = datetime.datetime.now()
    source = writer_source(source_dataset)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF_STORAGE, generate_uid()
    for keyword in ("StudyInstanceUID", *PATIENT_STUDY_KEYWORDS):
        setattr(ds, keyword, source.get(keyword))
    for keyword in DEIDENTIFICATION_KEYWORDS:  # Type 3 and their Type 1C method, as in the SEG and the SR
        if keyword in source:
            ds[keyword] = source[keyword]
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID  # not in the IOD; ties the report to the source geometry
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "DOC", generate_uid(), PDF_SERIES_NUMBER
    ds.SeriesDescription = "Lung lesion report (automatic)"
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "SYN"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = REPORT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    key_slices = dict.fromkeys(r["axial_slice_sop_instance_uid"] for r in document["lesions"])
    if key_slices:  # Type 1C: present (with items) when the document derives from images
        ds.SourceInstanceSequence = [Dataset() for _ in key_slices]
        for item, uid in zip(ds.SourceInstanceSequence, key_slices):
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source_dataset.SOPClassUID, uid
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)  # OB values have an even length
    return ds
