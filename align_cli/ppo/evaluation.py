"""PPO's evaluation: sample one response per eval prompt, score it as training does, and
append every row to the run folder's sample table (`samples.jsonl`)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .sharding import is_sharded

SAMPLES_NAME = "samples.jsonl"  # in the run folder: the eval-time sample table


class PPOEvaluation:
    """`evaluate()` for `PPOTrainer` (a mixin): the experience maker's sampling and scoring, no update."""

    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"):
        """Samples a response to every eval prompt, scores it, and appends the rows to samples.jsonl.

        Returns:
            `{prefix}_score`, `{prefix}_response_length`, `{prefix}_eos_rate` and one
            `{prefix}_rewards/<name>/mean` per reward function when there are several.
        """
        from ..rewards import message_text

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        maker = self.experience_maker
        prompt_ids = (
            self._eval_prompt_ids if dataset is self.eval_dataset else self._tokenize_prompts(dataset)
        )
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(rank, len(prompt_ids), world))
        size = self.args.per_device_eval_batch_size
        scores, lengths, eos, funcs, table = [], [], [], [], []
        # A sharded policy samples only with every rank at once: each runs the same batches of
        # the same size, the missing rows filled with the first prompt and dropped after.
        lockstep = is_sharded(maker.policy) and world > 1
        most = -(-len(prompt_ids) // world)
        for s in range(0, most if lockstep else len(mine), size):
            rows = mine[s : s + size]
            if lockstep:
                filler = [0] * (min(size, most - s) - len(rows))
                sampled = maker.sample([prompt_ids[r] for r in rows + filler])
                if not rows:
                    continue
                sequences, attention_mask, mask = (t[: len(rows)] for t in sampled[:3])
            else:
                sequences, attention_mask, mask, _ = maker.sample([prompt_ids[r] for r in rows])
            score, per_func, texts = maker.score(rows, dataset, sequences, attention_mask, mask)
            # The same score as training's, so eval_score and score compare.
            score, has_eos = maker.penalize_missing_eos(score, sequences, mask.shape[1])
            scores.append(score.float().cpu())
            lengths.append(mask.sum(1).cpu())
            eos.append(has_eos.float().cpu())
            funcs.append(per_func)
            prompts = dataset[rows]["prompt"]
            batch = [
                {"prompt": message_text(p), "completion": t, "score": round(float(v), 6)}
                for p, t, v in zip(prompts, texts, score.tolist(), strict=True)
            ]
            for column, values in maker.user_extra.items():  # a reward's log_extra columns
                if len(values) == len(batch):
                    for row, value in zip(batch, values, strict=True):
                        row.setdefault(column, value)
            maker.user_extra.clear()
            table += batch
        logged = maker.user_metrics_of_step()  # log_metric during evaluation
        # Gathered as objects: ranks may hold different numbers of prompts, even none, and each
        # must join every collective call.
        local = (
            torch.cat(
                [
                    torch.stack([torch.cat(scores), torch.cat(lengths).float(), torch.cat(eos)], 1),
                    torch.cat(funcs),
                ],
                dim=1,
            ).tolist()
            if mine
            else []
        )
        if world > 1:
            from accelerate.utils import gather_object

            local, table = gather_object(local), gather_object(table)
        metrics: dict[str, float] = {}
        if local:
            every = torch.tensor(local, dtype=torch.float64)  # (N, 3 + F)
            metrics = {
                f"{metric_key_prefix}_score": every[:, 0].mean().item(),
                f"{metric_key_prefix}_response_length": every[:, 1].mean().item(),
                f"{metric_key_prefix}_eos_rate": every[:, 2].mean().item(),
            }
            if len(maker.reward_funcs) > 1:
                for i, name in enumerate(maker.reward_names):
                    metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = every[:, 3 + i].nanmean().item()
        metrics.update({f"{metric_key_prefix}_{name}": value for name, value in logged.items()})
        if self.args.should_save and table:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, SAMPLES_NAME), "a", encoding="utf-8") as f:
                for row in table:
                    f.write(json.dumps({"step": self.state.global_step, **row}, ensure_ascii=False) + "\n")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
