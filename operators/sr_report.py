"""The lesion measurements as a DICOM Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

`build_measurement_sr(source_datasets, document, ...)` builds it from the lesions.json document
alone, so the SR holds the same values as lesions.json:
- one Volumetric ROI measurement group (TID 1411) per lesion: tracking ID/UID of its SEG segment,
  the segment referenced (with the source series), finding site from the lesion's location, and the
  measurements of `LESION_MEASUREMENTS`; the axial diameters reference the slice they lie on
  (their end points are in lesions.json and on the key image: TID 1411 measurements carry no
  coordinates);
- one Measurements group (TID 1501) "Tumour burden": lesion count, total volume, RECIST 1.1 sum;
- the key slices (those of the axial diameters) in the image library, with their frame of
  reference; every source slice and the SEG as evidence (Current Requested Procedure Evidence).
A study without lesions gets a report with the burden group only. The SR needs the SEG that the
groups reference: `document["seg"]` must be set when there are lesions.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from operators.seg_writer import MANUFACTURER, writer_sources

SR_FILE = "sr.dcm"
SR_SERIES_NUMBER = 902
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
# Record key: (concept name, unit, derivation, method); (name, derivation) tells the measurements apart.
LESION_MEASUREMENTS = {
    "volume_ml": (codes.SCT.Volume, MILLILITER, None, None),
    "long_axis_mm": (codes.SCT.LongAxis, codes.UCUM.Millimeter, None, codes.DCM.RECIST1Point1),
    "short_axis_mm": (codes.SCT.ShortAxis, codes.UCUM.Millimeter, None, codes.DCM.RECIST1Point1),
    "longest_diameter_3d_mm": (codes.SCT.Diameter, codes.UCUM.Millimeter, codes.SCT.Maximum, None),
    "mean_hu": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit, codes.SCT.Mean, None),
    "sd_hu": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit, codes.SCT.StandardDeviation, None),
    "max_hu": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit, codes.SCT.Maximum, None),
    "score": (codes.SCT.Score, codes.UCUM.NoUnits, None, None),
}
BURDEN_MEASUREMENTS = {
    "lesion_count": (codes.SCT.NumberOfLesions, codes.UCUM.NoUnits, None, None),
    "total_volume_ml": (codes.SCT.Volume, MILLILITER, codes.SCT.Total, None),
    "recist_sum_mm": (codes.SCT.Diameter, codes.UCUM.Millimeter, codes.SCT.Total, codes.DCM.RECIST1Point1),
}
BURDEN_TRACKING_ID = "Tumour burden"
_REGION_SITES = {"lung": None, "hilum": codes.SCT.HilumOfLung, "mediastinum": codes.SCT.Mediastinum}
_ZONE_SITES = {"upper": codes.SCT.UpperZoneOfLung, "middle": codes.SCT.MiddleZoneOfLung,
               "lower": codes.SCT.LowerZoneOfLung}
_SIDES = {"right": codes.SCT.Right, "left": codes.SCT.Left, None: None}


def finding_site(location: dict | None) -> hd.sr.FindingSite | None:
    """The coded site of a lesion location (operators.measurements.lesion_location)."""
    if location is None:
        return None
    site = _REGION_SITES[location["region"]] or _ZONE_SITES[location["zone"]]
    return hd.sr.FindingSite(site, laterality=_SIDES[location["side"]])


def _measurements(values: dict, table: dict, **common) -> list[hd.sr.Measurement]:
    return [hd.sr.Measurement(name=name, value=values[key], unit=unit, derivation=derivation, method=method,
                              **common.get(key, {}))
            for key, (name, unit, derivation, method) in table.items()]


def _lesion_group(record: dict, seg: dict, series_uid: str, source_by_uid: dict[str, Dataset],
                  algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    key_slice = source_by_uid[record["axial_slice_sop_instance_uid"]]
    on_key_slice = {"referenced_images": [hd.sr.SourceImageForMeasurement(
        key_slice.SOPClassUID, key_slice.SOPInstanceUID)]}
    site = finding_site(record["location"])
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=record["tracking_uid"], identifier=record["tracking_id"]),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg["sop_class_uid"], sop_instance_uid=seg["sop_instance_uid"],
            segment_number=record["segment_number"], source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_type=codes.SCT.Neoplasm,
        finding_sites=None if site is None else [site],
        algorithm_id=algorithm,
        measurements=_measurements(record, LESION_MEASUREMENTS, long_axis_mm=on_key_slice, short_axis_mm=on_key_slice),
    )


def _seg_reference(document: dict) -> Dataset:
    """The SEG's identity, the evidence an SR needs for the instances it references."""
    seg, reference = document["seg"], Dataset()
    reference.SOPClassUID, reference.SOPInstanceUID = seg["sop_class_uid"], seg["sop_instance_uid"]
    reference.StudyInstanceUID, reference.SeriesInstanceUID = document["study_instance_uid"], seg["series_instance_uid"]
    return reference


def build_measurement_sr(source_datasets: Sequence[Dataset], document: dict, *, algorithm_name: str = "lesion_seg",
                         algorithm_version: str = "0.1.0") -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of the lesions.json `document` on its source slices (module docstring)."""
    records = document["lesions"]
    if records and document["seg"] is None:
        raise ValueError("the SR references the lesions' SEG segments, but no SEG was written")
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    sources = writer_sources(source_datasets)
    source_by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    groups = [_lesion_group(r, document["seg"], document["series_instance_uid"], source_by_uid, algorithm)
              for r in records]
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=BURDEN_TRACKING_ID),
        algorithm_id=algorithm,
        measurements=_measurements(document["burden"], BURDEN_MEASUREMENTS)))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm_name, manufacturer_name=MANUFACTURER, model_name=algorithm_name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        referenced_images=list({r["axial_slice_sop_instance_uid"]: source_by_uid[r["axial_slice_sop_instance_uid"]]
                                for r in records}.values()),
    )
    evidence = list(sources)
    if document["seg"] is not None:
        evidence.append(_seg_reference(document))
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="Lung lesion measurements (automatic)",
    )
