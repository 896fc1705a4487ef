#!/usr/bin/env bash
# Fig. 7 analog on Walker2d-v5 and Ant-v5 with our ARS experts (see experiments/gym/README.md):
# demos from each expert (Walker2d clean: its linear ARS policy falls at once under action noise,
# 898 +- 326 return at noise 0.05; Ant with N(0, 0.2^2) action noise: 2438 +- 576), then the four
# GPs with and without AP at lr 1e-3, seeds 0-4.
set -euo pipefail
cd "$(dirname "$0")/../.."
python scripts/make_gym_demos.py env=Walker2d-v5 expert=experts/Walker2d-v5.npz episodes=10 \
    dataset_id=dopr/walker2d/ars-expert-v0 overwrite=true
python scripts/make_gym_demos.py env=Ant-v5 expert=experts/Ant-v5.npz episodes=10 action_noise=0.2 \
    dataset_id=dopr/ant/ars-expert-noisy-v0 overwrite=true
for env in walker2d ant; do
  python run.py -m experiment=gym_${env}_fig7 hydra/launcher=local
  python scripts/aggregate.py sweep=multirun/gym_${env}_fig7 group=opt.name,opt.lr out=results/gym/$env
done
# Walker2d, where AP helped at lr 1e-3: the two other learning rates of the Hopper sweep, same seeds.
python run.py -m experiment=gym_walker2d_fig7 hydra/launcher=local opt.lr=3e-4,3e-3
python scripts/aggregate.py sweep=multirun/gym_walker2d_fig7 group=opt.name,opt.lr out=results/gym/walker2d
# Walker2d fresh seeds 5-9, each optimizer at its best lr on seeds 0-4 (choice.md of study=gym_walker2d).
python run.py -m experiment=gym_walker2d_fig7 hydra/launcher=local seed=5,6,7,8,9 opt=adamw,dopr_adamw,muon,dopr_muon,dopr_signum,adamuon,dopr_adamuon opt.lr=3e-3 hydra.sweep.dir=multirun/gym_walker2d_fig7_holdout/lr3e-3
python run.py -m experiment=gym_walker2d_fig7 hydra/launcher=local seed=5,6,7,8,9 opt=signum opt.lr=3e-4 hydra.sweep.dir=multirun/gym_walker2d_fig7_holdout/lr3e-4
python scripts/aggregate.py sweep=multirun/gym_walker2d_fig7_holdout group=opt.name,opt.lr out=results/gym/walker2d/holdout
# The studies' files (runs.csv, provenance.json, paired cells, chosen lrs, verdicts on seeds 5-9, figures).
python scripts/study.py study=gym_ant
python scripts/study.py study=gym_walker2d sweep=results/gym/walker2d/evals.csv,results/gym/walker2d/holdout/evals.csv
