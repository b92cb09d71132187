# Two set-up commands for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo test clean

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

demo: setup data
	$(PY) -m hipp eval --model checkpoints/teacher-tiny

test: setup data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs outputs
