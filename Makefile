# make demo: set up .venv, generate a synthetic chest CT study, run the app on it, print the lesions.
# make test: set up .venv (and dicom3tools; Orthanc with its DICOMweb plugin for tests/test_pacs.py), run the test suite.
# make package: build the MAP image (Docker with buildx and access to nvcr.io), or where Docker is absent
#   write and check its build context in build/map (deploy/package.py).
# make evaluate: the whole app's analysis (thorax box, network, cascade) on real CT and phantoms: validation
#   (real-train, and real-train as other scanners image it: 6 and 9 mm slices, low dose, sharp kernel, no contrast,
#   a field of view ending in the liver dome; 20 validation phantoms, 12 with every lesion kind up to 100 mm) then
#   test (the test-only real cases, 30 held-out phantoms); per lesion found or not and the step that lost it, per
#   false lesion its size and place (runs/eval_real/*/report.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := output/demo
SEED ?= 7
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test package evaluate

$(VENV)/.ready: requirements.txt requirements-dev.txt requirements-package.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.ready
	$(PY) -m training.phantom --seed $(SEED) --lesions 4 --out $(DEMO)/study --format dicom
	$(PY) app -i $(DEMO)/study/dicom -o $(DEMO)/output > $(DEMO)/app.log
	@$(PY) -c 'import json, sys; lesions = json.load(open(sys.argv[1]))["lesions"]; \
	print("%-10s %8s %9s %10s %8s %6s  %s" % ("lesion", "long mm", "short mm", "volume ml", "mean HU", "score", "centroid (LPS mm)")); \
	[print("%-10s %8.1f %9.1f %10.2f %8.0f %6.2f  %s" % (l["label"], l["long_axis_mm"], l["short_axis_mm"], l["volume_ml"], \
	l["mean_hu"], l["score"], l["centroid_mm"])) for l in lesions]; print(len(lesions), "lesions")' $(DEMO)/output/lesions.json
	@echo "outputs: $(DEMO)/output/lesions.json $$(ls $(DEMO)/output/seg.dcm 2>/dev/null); log: $(DEMO)/app.log; truth: $(DEMO)/study/lesions.json"

test: $(VENV)/.ready
	command -v dciodvfy > /dev/null && command -v Orthanc > /dev/null && [ -f $(ORTHANC_DICOMWEB) ] || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dicom3tools orthanc orthanc-dicomweb; }
	$(PY) -m pytest -q tests

package: $(VENV)/.ready
	$(PY) -m deploy.package

REAL ?= ../shared/data/real
REAL_TRAIN ?= ../shared/data/real-train
ALL_KINDS := solid lobulated spiculated part_solid ggo cavitating juxtapleural juxtavascular perihilar node mass faint_ggo
evaluate: $(VENV)/.ready
	$(PY) -m training.make_dataset --out data/val --count 20 --first-seed 2000
	$(PY) -m training.make_dataset --out data/val_wide --count 12 --first-seed 2100 --kinds $(ALL_KINDS) --max-lesion-mm 100
	$(PY) -m training.make_dataset --out data/heldout --count 30 --first-seed 3000
	$(PY) -m training.scanner_variants --real $(REAL_TRAIN) --out data/scanner_variants
	$(PY) -m training.real_backgrounds --real-train $(REAL_TRAIN) --out data/rb_ggo40 --seeds 2 --count 5 --kinds ggo faint_ggo
	$(PY) -m training.evaluate_real --set "real-train (validation)" $(REAL_TRAIN) --set "validation phantoms" data/val \
		--set "validation phantoms, wide kinds" data/val_wide \
		--set "ground glass in real lungs" data/rb_ggo40 \
		$(foreach v,slices_6mm slices_9mm low_dose sharp_kernel non_contrast short_field,--set "real-train, $(v)" data/scanner_variants/$(v)) \
		--out runs/eval_real/validation
	$(PY) -m training.evaluate_real --set "real (test only)" $(REAL) --set "held-out phantoms" data/heldout \
		--out runs/eval_real/test
