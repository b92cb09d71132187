#!/bin/bash
# Every figure in BENCHMARKS.md after a change to the teacher, one after the other (about 40 min on
# 2 cores; nothing else may run meanwhile). Outputs: runs/measure/*.out, times in runs/measure/times.txt.
# It retrains runs/hipp-tiny and runs/hipp-hf-tiny and rewrites runs/bench, runs/pareto from scratch.
# `measure_all.sh controller`: only the figures a change to the controller's training can move
# (about 35 min): the teacher and the real-width speed-ups are left alone.
set -x
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M=runs/measure
mkdir -p $M
t() { local name=$1; shift; local s=$(date +%s); "$@" > $M/$name.out 2> $M/$name.err; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $M/times.txt; }
ALL=$([ "$1" = controller ] && echo no || echo yes)
if [ $ALL = yes ] || [ ! -d runs/teacher-tiny-hf ]; then
  rm -rf runs/teacher-tiny-hf
  t convert $PY -m hipp convert --model checkpoints/teacher-tiny --out runs/teacher-tiny-hf --json
fi
if [ $ALL = yes ]; then
  t eval_teacher $PY -m hipp eval --model checkpoints/teacher-tiny --json
  t eval_teacher_hf $PY -m hipp eval --model runs/teacher-tiny-hf --json
fi
rm -rf runs/hipp-tiny runs/hipp-hf-tiny
t train $PY -m hipp train --config configs/hipp_tiny.yaml
t train_hf $PY -m hipp train --config configs/hf_clip_tiny.yaml
t check_controller $PY benchmarks/check_controller.py --controller runs/hipp-tiny --points 11
t check_controller_hf $PY benchmarks/check_controller.py --controller runs/hipp-hf-tiny --points 11
t check_budgets $PY benchmarks/check_budgets.py --controller runs/hipp-tiny
t speedup $PY benchmarks/bench_speedup.py --controller runs/hipp-tiny --max-flops 0.3,0.5,0.7 --repeats 10
t speedup_hf $PY benchmarks/bench_speedup.py --controller runs/hipp-hf-tiny --max-flops 0.3,0.5,0.7 --repeats 10
if [ $ALL = yes ]; then
  t speedup_vitb32 $PY benchmarks/bench_speedup.py --model ViT-B-32 --max-flops 0.3,0.5,0.7 --repeats 6 --warmup 2
  t speedup_hf_clip $PY benchmarks/bench_speedup.py --model hf:clip --max-flops 0.3,0.5,0.7 --repeats 6 --warmup 2
  t speedup_hf_siglip $PY benchmarks/bench_speedup.py --model hf:siglip --max-flops 0.3,0.5,0.7 --repeats 6 --warmup 2
fi
rm -rf runs/pareto
t pareto $PY -m hipp pareto --controller runs/hipp-tiny --points 15 --out runs/pareto --json
t train_step $PY benchmarks/bench_train_step.py --model checkpoints/teacher-tiny --batch 64 --repeats 10
rm -rf runs/bench
t bench $PY -m hipp bench --controller runs/hipp-tiny --budgets 0.3,0.5,0.7 --out runs/bench --json
echo done >> $M/times.txt
