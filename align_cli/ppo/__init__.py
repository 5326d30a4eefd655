"""Our PPO (seed sections 2.3-2.4): TRL 1.13+ no longer ships a PPOTrainer, so we own one.

Split the way OpenRLHF splits it, so each piece can be read and tested alone:

- `models.py`: which network plays which role (policy, reference, critic, reward models) and
  how logits, values and scores are read from each;
- `experience.py`: the `Experience` a rollout produces (token ids, masks, log-probabilities,
  values, rewards, advantages) and the `ExperienceMaker` that makes it (generate -> score ->
  shaped reward -> values -> advantages), which needs no Trainer;
- `core.py`: pure tensor functions: the KL-shaped per-token reward, GAE, masked statistics,
  and the fixed and adaptive KL controllers;
- `losses.py`: the clipped surrogate policy loss, the clipped value loss, the entropy bonus,
  each returning its metrics;
- `update.py`: the optimiser steps over a rollout batch, and the critic's own learning rate;
- `config.py`: `PPOConfig`, the `TrainingArguments` subclass that `method.args` fills;
- `trainer.py`: the loop that orchestrates rollout, update and bookkeeping, and keeps
  transformers' callbacks (logging, progress, checkpoints) working;
- `evaluation.py`: sampling evaluation and the `samples.jsonl` table;
- `checkpoints.py`: what a PPO checkpoint adds (critic, KL state) and how a run resumes.
"""
