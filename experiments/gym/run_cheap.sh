#!/usr/bin/env bash
# Which cheap AP settings keep the robot-task rollout gain (issue 7)? Hopper-v5 noisy demos
# (configs/experiment/gym_fig7.yaml), Muon vs DoPr-Muon at lr 3e-3 (where DoPr-Muon gained
# +854 +- 310 return over Muon in the Fig. 7 study), seeds 0-4; DoPr-Muon with the default AP,
# with rows sub-sampled to 64 of 256, and with statistics + inverses every 10 steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
common="experiment=gym_fig7 hydra/launcher=local seed=0,1,2,3,4 opt.lr=3e-3"
python run.py -m $common opt=muon,dopr_muon hydra.sweep.dir=multirun/gym_cheap/default
python run.py -m $common opt=dopr_muon opt.ap.max_rows=64 hydra.sweep.dir=multirun/gym_cheap/rows64
python run.py -m $common opt=dopr_muon opt.ap.stat_interval=10 opt.ap.inverse_interval=10 hydra.sweep.dir=multirun/gym_cheap/every10
python scripts/aggregate.py sweep=multirun/gym_cheap group=opt.name,opt.ap.max_rows,opt.ap.stat_interval out=results/gym/cheap
python scripts/study.py study=gym_hopper_cheap   # paired cells (cells.md) and provenance
