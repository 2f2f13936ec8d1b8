# HLFDSegment: `make demo` (set-up + main job), `make test` (CI), `make test-fast`, `make bench`,
# `make bench-kd`, `make lint`, `make models` / `make models-gpu` (the built-in students).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/demo

.PHONY: setup demo test test-fast lint bench real-ct bench-kd models models-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # CPU wheel; an unpinned torch pulls CUDA builds
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python -m hlfd_train.demo $(OUT)

# Tests run on one process per core (pytest-xdist; each with one torch thread, Testing/conftest.py).
# On a busy machine (another job holding a core) -n 0 can be quicker: make test XDIST=0.
XDIST ?= auto
test: setup          # the full suite (CI); the 10 slowest tests are listed so growth shows
	$(BIN)/python -m pytest -q -n $(XDIST) --durations=10

test-fast: setup     # the edit loop: everything but the tests marked slow (a second or more each)
	$(BIN)/python -m pytest -q -n $(XDIST) -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/bench_pipeline.py

real-ct: setup       # the built-in students on public real CTs (downloads TotalSegmentator's
                     # 38 MB source release once, sha256 checked; see training/hlfd_train/realct.py);
                     # IRCADB="DIR..." adds 3D-IRCADb-01 patient folders you have
	$(BIN)/hlfd-train real-ct docs/results/real-ct --models HLFDSegment/Resources/Models/liver \
		HLFDSegment/Resources/Models/kidney $(if $(IRCADB),--ircadb $(IRCADB))

bench-kd: setup      # distillation benchmark (cpu: ~95 min here; PRESET=quick ~10 min;
                     # PRESET=gpu or synth-gpu (synthetic CT) on a GPU)
	$(BIN)/hlfd-train bench --preset $(or $(PRESET),cpu) --out runs/kd-bench-$(or $(PRESET),cpu) \
		--report docs/results/kd-benchmark$(if $(filter quick,$(PRESET)),-quick)$(if \
		$(filter synth-gpu,$(PRESET)),-synth).md

# The built-in students, from nothing: synthetic CT -> teacher -> distilled student -> package
# (about 60 min per task on 2 cores; TASKS="liver" for one), then a 45-minute stage on the
# on-the-fly stream (liver: two, the second 55 min); the tumour threshold (kidney) and lesion
# seed (hysteresis; both) are calibrated on separate cases; the liver model (0.5.0) is then the
# weight average (hlfd-train soup) of 0.4.1 and three fine-tunes of it (kd, stream), 0.6.0 that
# soup fine-tuned on fatty livers and ascites (synth-liver-disease.yaml), 0.6.1 the soup of 0.6.0
# and a fine-tune of it with fields of view down to 130 mm (synth-liver-fov.yaml; 0.6.0's
# thresholds), 0.6.3 the 1:3 weighted soup of 0.6.1 and a fine-tune of it on cases cropped to
# the liver (synth-liver-roi.yaml, then synth-liver-roi-neg.yaml; 0.6.2 was their plain mean),
# with the cyst rule, recalibrated (the card's figures: docs/results/synth-to-real.md), the
# kidney model 0.4.0 likewise of 0.3.2 and three fine-tunes, and the kidney model 0.5.0 the
# soup of two 2.5D stream fine-tunes of 0.4.0 (three slices in) and 0.4.0 lifted (0.5.1: the
# same weights, lesions of water density become kidney: cyst_max_hu), and kidney 0.6.0 that
# one fine-tuned with two extra classes, the spleen and the liver, folded into background at
# inference (synth-kidney-aux2.yaml, 0.5.1's thresholds). Overwrites
# Resources/Models/<task>. (The shipped kidney student had one more stage in between,
# synth-kidney-ft.yaml, on data of a corrected generator; from nothing, the first stage uses it.)
# Last, each card's run time: median of 5 through the runtime pipeline on a 512 x 512 x 97 CT.
TASKS ?= liver kidney
# $(call soup,TASK,OLD,INGREDIENT,NEW): the shipped TASK model OLD, the best and last checkpoints
# of its kd fine-tune (synth-TASK-kd.yaml) and the last of the stream fine-tune
# synth-TASK-INGREDIENT.yaml, averaged (hlfd-train soup), calibrated and installed as NEW
liver_soup_calibration = training/configs/synth-liver-stream2.yaml \
  --set data.root=data/synth-liver-cal 'data.splits=[0,20,0]' --offsets=0 \
  --seed-offsets=-8,-7,-6,-5,-4 --max-fp-ml 1000
kidney_soup_calibration = training/configs/synth-kidney-stream.yaml \
  --set data.root=data/synth-kidney-cal40 'data.splits=[0,40,0]' --offsets=-4,-3,-2 \
  --seed-offsets=-8,-7,-6
define soup
rm -rf runs/$(1)-$(2) && cp -r HLFDSegment/Resources/Models/$(1) runs/$(1)-$(2) && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train teacher -c training/configs/synth-$(1)-kd.yaml -q && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-$(1)-kd.yaml -q \
	    --set train.minutes=20 train.lr=2.0e-4 && \
	  for w in best last; do $(BIN)/hlfd-train export runs/synth-$(1)-kd/kd-seed0 --which $$w \
	    --half --no-timing -o runs/$(1)-kd-$$w || exit 1; done && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-$(1)-$(3).yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-$(1)-$(3)/none-seed0 --which last --half --no-timing \
	    -o runs/$(1)-$(3) && \
	  $(BIN)/hlfd-train soup runs/$(1)-soup4 runs/$(1)-$(2) runs/$(1)-kd-best runs/$(1)-kd-last \
	    runs/$(1)-$(3) --version $(4) && \
	  $(BIN)/hlfd-train calibrate runs/$(1)-soup4 --split val --write -c $($(1)_soup_calibration) && \
	  rm -rf HLFDSegment/Resources/Models/$(1) && \
	  cp -r runs/$(1)-soup4 HLFDSegment/Resources/Models/$(1)
endef

models: setup
	for t in $(TASKS); do \
	  $(BIN)/hlfd-train synth write data/synth-$$t --task $$t --cases 56 --jobs 2 && \
	  $(BIN)/hlfd-train teacher -c training/configs/synth-$$t.yaml -q && \
	  $(BIN)/hlfd-train distill -c training/configs/synth-$$t.yaml -q && \
	  $(BIN)/python -m hlfd_train.ship $$t || exit 1; \
	done
	if echo " $(TASKS) " | grep -q " liver "; then \
	  $(BIN)/hlfd-train synth write data/synth-liver-v2 --task liver --cases 8 --jobs 2 && \
	  $(BIN)/hlfd-train distill -c training/configs/synth-liver-stream.yaml -q && \
	  $(BIN)/python -m hlfd_train.ship liver --recipe synth-liver-stream --version 0.3.0 && \
	  rm -rf runs/liver-0.3.0 && cp -r HLFDSegment/Resources/Models/liver runs/liver-0.3.0 && \
	  $(BIN)/hlfd-train synth write data/synth-liver-val --task liver --cases 6 --seed 2000 \
	    --layout msd --jobs 2 && \
	  $(BIN)/hlfd-train distill -c training/configs/synth-liver-stream2.yaml -q && \
	  $(BIN)/python -m hlfd_train.ship liver --recipe synth-liver-stream2 --version 0.4.1 && \
	  $(BIN)/hlfd-train synth write data/synth-liver-cal --task liver --cases 20 --seed 4000 \
	    --layout msd --jobs 2 && \
	  $(BIN)/hlfd-train calibrate HLFDSegment/Resources/Models/liver \
	    -c training/configs/synth-liver-stream2.yaml --set data.root=data/synth-liver-cal \
	    'data.splits=[0,20,0]' --offsets=0 --seed-offsets=-6,-5,-4,-3 --max-fp-ml 1000 --write && \
	  $(call soup,liver,0.4.1,ing31,0.5.0) && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-liver-disease.yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-liver-disease/none-seed0 --which last --half \
	    --no-timing -o runs/liver-disease && \
	  $(BIN)/hlfd-train card runs/liver-disease --set name=synth-liver-student version=0.6.0 \
	    'title=Liver + liver tumor (student, synthetic CT)' && \
	  $(BIN)/hlfd-train calibrate runs/liver-disease --split val --write \
	    -c $(liver_soup_calibration) && \
	  $(BIN)/hlfd-train add-onnx runs/liver-disease && \
	  rm -rf HLFDSegment/Resources/Models/liver && \
	  cp -r runs/liver-disease HLFDSegment/Resources/Models/liver && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-liver-fov.yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-liver-fov/none-seed0 --which last --half \
	    --no-timing -o runs/liver-fov && \
	  $(BIN)/hlfd-train soup runs/liver-soup-fov runs/liver-disease runs/liver-fov \
	    --version 0.6.1 && \
	  $(BIN)/hlfd-train add-onnx runs/liver-soup-fov && \
	  rm -rf HLFDSegment/Resources/Models/liver && \
	  cp -r runs/liver-soup-fov HLFDSegment/Resources/Models/liver && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-liver-roi.yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-liver-roi/none-seed0 --which last --half \
	    --no-timing -o runs/liver-roi && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-liver-roi-neg.yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-liver-roi-neg/none-seed0 --which last --half \
	    --no-timing -o runs/liver-roi-neg && \
	  $(BIN)/hlfd-train soup runs/liver-063 HLFDSegment/Resources/Models/liver runs/liver-roi-neg \
	    --weights 0.25 0.75 --version 0.6.3 && \
	  $(BIN)/hlfd-train card runs/liver-063 --set postprocessing.cyst_max_hu=20 && \
	  $(BIN)/hlfd-train calibrate runs/liver-063 --split val --write \
	    -c training/configs/synth-liver-stream2.yaml --set data.root=data/synth-liver-cal \
	    'data.splits=[0,20,0]' --offsets=-2,-1,0 --seed-offsets=-10,-8,-6,-4 --max-fp-ml 30.2 && \
	  rm -rf HLFDSegment/Resources/Models/liver && \
	  cp -r runs/liver-063 HLFDSegment/Resources/Models/liver; \
	fi
	if echo " $(TASKS) " | grep -q " kidney "; then \
	  rm -rf runs/kidney-0.2.0 && cp -r HLFDSegment/Resources/Models/kidney runs/kidney-0.2.0 && \
	  $(BIN)/hlfd-train synth write data/synth-kidney-eval --task kidney --cases 12 --seed 1000 \
	    --jobs 2 && \
	  $(BIN)/hlfd-train distill -c training/configs/synth-kidney-stream.yaml -q && \
	  $(BIN)/python -m hlfd_train.ship kidney --recipe synth-kidney-stream --version 0.3.2 && \
	  $(BIN)/hlfd-train synth write data/synth-kidney-cal --task kidney --cases 10 --seed 4000 \
	    --set tumour_free=0.5 --jobs 2 && \
	  $(BIN)/hlfd-train calibrate HLFDSegment/Resources/Models/kidney \
	    -c training/configs/synth-kidney-stream.yaml --set data.root=data/synth-kidney-cal \
	    'data.splits=[0,10,0]' --offsets=-6,-5,-4,-3,-2,-1,0 --write && \
	  $(BIN)/hlfd-train synth write data/synth-kidney-cal40 --task kidney --cases 40 --seed 4000 \
	    --set tumour_free=0.55 --jobs 2 && \
	  $(BIN)/hlfd-train calibrate HLFDSegment/Resources/Models/kidney \
	    -c training/configs/synth-kidney-stream.yaml --set data.root=data/synth-kidney-cal40 \
	    'data.splits=[0,40,0]' --offsets=-3,-2 --seed-offsets=-8,-7,-6,-5 --write && \
	  $(BIN)/hlfd-train synth write data/synth-kidney-val --task kidney --cases 6 --seed 2000 \
	    --jobs 2 && \
	  $(call soup,kidney,0.3.2,ing41,0.4.0) && \
	  rm -rf runs/kidney-0.4.0 && cp -r HLFDSegment/Resources/Models/kidney runs/kidney-0.4.0 && \
	  for r in 25d 25db; do \
	    OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-kidney-$$r.yaml -q && \
	    $(BIN)/hlfd-train export runs/synth-kidney-$$r/none-seed0 --which last --half --no-timing \
	      -o runs/kidney-$$r || exit 1; \
	  done && \
	  $(BIN)/hlfd-train soup runs/kidney-soup3 runs/kidney-25d runs/kidney-25db runs/kidney-0.4.0 \
	    --version 0.5.0 --name synth-kidney-student \
	    --title "Kidney + kidney tumor (student, synthetic CT)" && \
	  $(BIN)/hlfd-train calibrate runs/kidney-soup3 --split val --write \
	    -c $(kidney_soup_calibration) && \
	  $(BIN)/hlfd-train add-onnx runs/kidney-soup3 && \
	  rm -rf HLFDSegment/Resources/Models/kidney && \
	  cp -r runs/kidney-soup3 HLFDSegment/Resources/Models/kidney && \
	  $(BIN)/hlfd-train card HLFDSegment/Resources/Models/kidney \
	    --set postprocessing.cyst_max_hu=20 version=0.5.1 && \
	  OMP_NUM_THREADS=1 $(BIN)/hlfd-train distill -c training/configs/synth-kidney-aux2.yaml -q && \
	  $(BIN)/hlfd-train export runs/synth-kidney-aux2/none-seed0 --which last --half --no-timing \
	    -o runs/kidney-aux2 && \
	  $(BIN)/hlfd-train card runs/kidney-aux2 --set 'inference.logit_offsets=[0.0, 0.0, -4.0]' \
	    'inference.seed_offsets=[0.0, 0.0, -7.0]' postprocessing.cyst_max_hu=20 \
	    name=synth-kidney-student version=0.6.0 \
	    'title=Kidney + kidney tumor (student, synthetic CT)' && \
	  $(BIN)/hlfd-train add-onnx runs/kidney-aux2 && \
	  rm -rf HLFDSegment/Resources/Models/kidney && \
	  cp -r runs/kidney-aux2 HLFDSegment/Resources/Models/kidney; \
	fi
	$(BIN)/hlfd-train synth write data/timing --task liver --cases 1 --seed 7700 --matrix 512 \
	  --set fov_cut=0 'fov_mm=[400,400]' 'slice_mm=[2.5]' 'slice_weights=[1]'
	for t in $(TASKS); do $(BIN)/hlfd-train runtime HLFDSegment/Resources/Models/$$t \
	  data/timing/imagesTr/liver_0.nii.gz --write || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache

# The GPU variant of both students (synth-{liver,kidney}-gpu.yaml: teacher, then kd from it, both
# tasks side by side on one GPU; needs a CUDA build of torch in $(VENV) instead of the CPU pin),
# exported to runs/gpu/<task>-{best,last}; calibrate and compare them as for `models`.
models-gpu: setup
	HLFD_TRAIN=$(BIN)/hlfd-train training/models_gpu.sh runs/gpu
