#!/usr/bin/env bash
# The LDS study: every number in experiments/lds/README.md comes from these commands (run from the repo root
# with the venv active; about 1 min per run on a loaded 2-core box, ~20 s on an idle one).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
common="task=lds logger=none trainer.progress=false"
# 1. The issue's command: AdamW vs DoPr-AdamW at the default lr (1e-3), 5 seeds.
python run.py -m $common opt=adamw,dopr_adamw seed=0,1,2,3,4 hydra.sweep.dir=multirun/lds_study
python scripts/aggregate.py sweep=multirun/lds_study out=results/lds/lr1e-3
# 2. Learning rates around it, and the Muon pair, 5 seeds each.
python run.py -m $common opt=adamw,dopr_adamw opt.lr=3e-4,3e-3 seed=0,1,2,3,4 hydra.sweep.dir=multirun/lds_lr
python run.py -m $common opt=muon,dopr_muon seed=0,1,2,3,4 hydra.sweep.dir=multirun/lds_lr/muon
cp -r multirun/lds_study/. multirun/lds_lr/lr1e-3/
python scripts/aggregate.py sweep=multirun/lds_lr group=opt.name,opt.lr out=results/lds/lr_sweep
# 3. The study's files (results/lds: runs.csv, provenance.json, paired cells, verdicts) from that evals.csv.
python scripts/study.py study=lds
