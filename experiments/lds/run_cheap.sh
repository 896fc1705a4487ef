#!/usr/bin/env bash
# Which cheap AP settings keep the rollout gain on LDS (issue 7)? DoPr-AdamW at lr 1e-3, 5 seeds each;
# the default (statistics and inverse every step) is step 1 of run_study.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
common="task=lds opt=dopr_adamw logger=none trainer.progress=false seed=0,1,2,3,4"
python run.py -m $common opt.ap.stat_interval=10 opt.ap.inverse_interval=10 hydra.sweep.dir=multirun/lds_cheap/every10
python run.py -m $common opt.ap.ema=0.95 opt.ap.inverse_interval=10 hydra.sweep.dir=multirun/lds_cheap/ema_inv10
python run.py -m $common opt.ap.max_rows=16 hydra.sweep.dir=multirun/lds_cheap/rows16
cp -r multirun/lds_study/. multirun/lds_cheap/default/
python scripts/aggregate.py sweep=multirun/lds_cheap group=opt.name,opt.ap.stat_interval,opt.ap.inverse_interval,opt.ap.ema,opt.ap.max_rows out=results/lds/cheap
python scripts/study.py study=lds_cheap
