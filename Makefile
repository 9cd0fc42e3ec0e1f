# Every target creates .venv when missing. torch comes from the machine's local wheels with plain
# pip (uv and poetry would download several GB).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test test-full lint format clean demo demo-panoptic

# ONNX Runtime's C API headers, which detrkit's ONNX Runtime operators are built against (the tests
# build them): Debian's libonnxruntime-dev, unpacked under build/ (a system copy, from apt-get
# install libonnxruntime-dev on Debian 13 or later, is used where there is one).
ORT_HEADERS := build/onnxruntime/include/onnxruntime
export ONNXRUNTIME_INCLUDE_DIR ?= $(if $(wildcard /usr/include/onnxruntime/onnxruntime_c_api.h),/usr/include/onnxruntime,$(CURDIR)/$(ORT_HEADERS))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Trains a small Deformable DETR on the built-in digits dataset on the CPU, evaluates it and writes
# the checkpoint, metrics, plot and a picture of predictions under runs/demo, then the interactive
# page of the trained model on a new digits image (runs/demo/explore.html).
demo: $(VENV)/.installed
	rm -rf runs/demo
	$(BIN)/detrkit train --config configs/digits_demo.json --output runs/demo
	$(BIN)/detrkit data make-digits runs/demo/sample --train 1 --val 1 --seed 7
	$(BIN)/detrkit explore runs/demo/sample/val/000001.png --weights runs/demo/checkpoint.pth \
		--threshold 0.3 --out runs/demo/explore.html

# Trains DETR with its mask head on the digits' panoptic version (digits as things, the canvas as
# stuff) on the CPU, reporting box and mask AP and PQ, then segments two new digits images:
# runs/demo-panoptic/predictions.png and predict/ (masks drawn, COCO panoptic PNGs and JSON).
demo-panoptic: $(VENV)/.installed
	rm -rf runs/demo-panoptic
	$(BIN)/detrkit train --config configs/digits_panoptic_demo.json --output runs/demo-panoptic
	$(BIN)/detrkit data make-digits runs/demo-panoptic/sample --train 1 --val 2 --seed 7
	$(BIN)/detrkit predict runs/demo-panoptic/sample/val --weights runs/demo-panoptic/checkpoint.pth \
		--threshold 0.5 --panoptic --out runs/demo-panoptic/predict

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tests CI runs (about 8.5 min on a fresh clone on 2 cores, venv included); the explore page's
# tests need Debian's Chromium (apt-get install chromium), which .ci/run installs when missing. test-full adds
# the compiled models and the rest of the export matrix (every model x format x option, minutes
# per export on a CPU).
test: lint $(ONNXRUNTIME_INCLUDE_DIR)/onnxruntime_c_api.h
	$(BIN)/python -m pytest -q -m "not full"

test-full: lint $(ONNXRUNTIME_INCLUDE_DIR)/onnxruntime_c_api.h
	$(BIN)/python -m pytest -q

$(CURDIR)/$(ORT_HEADERS)/onnxruntime_c_api.h:
	tools/onnxruntime_headers.sh build/onnxruntime

# ONNXRUNTIME_INCLUDE_DIR set to a directory without the headers.
%/onnxruntime_c_api.h:
	@echo "ONNXRUNTIME_INCLUDE_DIR=$(ONNXRUNTIME_INCLUDE_DIR) has no onnxruntime_c_api.h; unset it to use build/onnxruntime" >&2
	@exit 1

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
