# Two set-up commands for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo demo-llava test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test,plot,onnx,tensorboard]"
	touch $@

# Fashion-MNIST comes from Debian's package; install it when missing and we are allowed to.
data:
	@test -f $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST steps will say so"

DEMO := runs/demo

# $(call train_or_resume,CONFIG,OUT): train a controller, or continue the one already in OUT
train_or_resume = @if [ -f $(2)/controller.json ]; then $(PY) -m hipp train --config $(1) --output $(2) --resume; \
	else $(PY) -m hipp train --config $(1) --output $(2); fi

# The main job on the embedded teacher: train a controller, query three preferences, export one
# plan as a smaller model, evaluate it, draw the front. Re-running continues (or reuses) the trained controller.
demo: setup data
	@echo "== 1/5 teacher: checkpoints/teacher-tiny (see its MODEL_CARD.md)"
	@echo "== 2/5 training the controller -> $(DEMO)/controller"
	$(call train_or_resume,configs/hipp_tiny.yaml,$(DEMO)/controller)
	@echo "== 3/5 three preferences"
	$(PY) -m hipp query --controller $(DEMO)/controller --pref utility=1
	$(PY) -m hipp query --controller $(DEMO)/controller --pref utility=0.5,flops=0.5
	$(PY) -m hipp query --controller $(DEMO)/controller --max-flops 0.5
	@echo "== 4/5 export the <=50% FLOPs plan and evaluate the smaller model"
	$(PY) -m hipp export --controller $(DEMO)/controller --max-flops 0.5 --out $(DEMO)/pruned-50 --json > $(DEMO)/export.json
	$(PY) -m hipp eval --model $(DEMO)/pruned-50 --json > $(DEMO)/pruned-50.eval.json
	$(PY) -m hipp eval --model $(DEMO)/pruned-50
	@echo "== 5/5 the front: every hard plan on a simplex grid, measured"
	$(PY) -m hipp pareto --controller $(DEMO)/controller --points 15 --out $(DEMO)/pareto
	@echo "outputs: $(DEMO)/pareto (pareto.png, pareto.md, pareto.csv), $(DEMO)/controller (controller + training log), $(DEMO)/pruned-50 (model.safetensors, pruned_config.json), $(DEMO)/pruned-50.eval.json"

LDEMO := runs/demo-llava

# The same story on the embedded LLaVA teacher (about 7 minutes on 2 cores): train, three
# preferences, export a <=50% FLOPs plan, let it answer, evaluate it, draw the front.
demo-llava: setup
	@echo "== 1/6 teacher: checkpoints/llava-tiny (see its MODEL_CARD.md)"
	@echo "== 2/6 training the controller -> $(LDEMO)/controller"
	$(call train_or_resume,configs/llava_controller.yaml,$(LDEMO)/controller)
	@echo "== 3/6 three preferences"
	$(PY) -m hipp query --controller $(LDEMO)/controller --pref utility=1
	$(PY) -m hipp query --controller $(LDEMO)/controller --pref utility=0.5,grounding=0.2,flops=0.3
	$(PY) -m hipp query --controller $(LDEMO)/controller --max-flops 0.5
	@echo "== 4/6 export the <=50% FLOPs plan, its kept projections refitted to the teacher (least squares); it answers test questions"
	$(PY) -m hipp export --controller $(LDEMO)/controller --max-flops 0.5 --reconstruct 256 --out $(LDEMO)/pruned-50 --json > $(LDEMO)/export.json
	$(PY) examples/ask.py --model $(LDEMO)/pruned-50 --n 4
	@echo "== 5/6 evaluate it: POPE, attributes, captions, Fashion-MNIST"
	$(PY) -m hipp eval --model $(LDEMO)/pruned-50 --json > $(LDEMO)/pruned-50.eval.json
	$(PY) -m hipp eval --model $(LDEMO)/pruned-50
	@echo "== 6/6 the front"
	$(PY) -m hipp pareto --controller $(LDEMO)/controller --points 10 --out $(LDEMO)/pareto
	@echo "outputs: $(LDEMO)/pareto, $(LDEMO)/controller, $(LDEMO)/pruned-50, $(LDEMO)/pruned-50.eval.json"

test: setup data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs outputs
