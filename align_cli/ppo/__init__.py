"""Our PPO (seed sections 2.3-2.4): TRL 1.13+ no longer ships a PPOTrainer, so we own one.

Split the way OpenRLHF splits it, so each piece can be read and tested alone:

- `experience.py`: the `Experience` a rollout produces (token ids, masks, log-probabilities,
  values, rewards, advantages), with the tensor shapes;
- `core.py`: pure tensor functions: the KL-shaped per-token reward, GAE, masked statistics,
  and the fixed and adaptive KL controllers;
- `losses.py`: the clipped surrogate policy loss, the clipped value loss, the entropy bonus,
  each returning its metrics;
- `config.py`: `PPOConfig`, the `TrainingArguments` subclass that `method.args` fills;
- `trainer.py`: the loop that orchestrates rollout, scoring and updates, and keeps
  transformers' callbacks (logging, progress, checkpoints) working.
"""
