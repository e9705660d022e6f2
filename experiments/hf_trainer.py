"""TARTAN's task weighting inside a Hugging Face Trainer: a Trainer subclass whose training_step hands each task's
loss to a tartan weighting (tartan.MTWeighting for Eq. 3, tartan.MetaWeighting for Algorithm 1) instead of
backward-ing one loss. The Trainer keeps everything else: its optimizer and schedule, clipping, logging, and gradient
accumulation, which the weighting follows (one weight update per optimizer step, g_k the mean over the step's
micro-batches), its checkpoints (the weighting's state beside the model's; a tied MLM decoder saved once) and resuming,
bf16/fp16 autocast, and its logs (alpha and META's cosines). experiments/test_hf_trainer.py drives it with a tiny BERT
built from a config."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import transformers

import tartan


class MultiTaskModel(nn.Module):
    """The shared body (tartan.HFBody) and one head per task, end-task first, as one module, so that the Trainer's
    optimizer holds all of them. forward is the end-task's (for the Trainer's evaluation and prediction)."""
    _keys_to_ignore_on_save = None  # what the Trainer asks a model on loading a checkpoint: none

    def __init__(self, body: nn.Module, heads: list[nn.Module]):
        super().__init__()
        self.body, self.heads = body, nn.ModuleList(heads)

    def forward(self, input_ids, attention_mask, labels=None):
        logits, loss = self.heads[0](self.body(input_ids=input_ids, attention_mask=attention_mask), labels)
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}


class TartanTrainer(transformers.Trainer):
    """A Trainer over the end-task's train_dataset (rows with input_ids, attention_mask, labels) that also trains
    the auxiliary tasks, weighted by `weighting`:
      weighting  tartan.MTWeighting or tartan.MetaWeighting over model.body, with grad_accum equal to
                 args.gradient_accumulation_steps;
      aux        one endless iterator of (inputs, labels) batches per auxiliary task, in model.heads order after
                 the end-task (tartan.batches gives them, MLM masking included);
      dev        (META) an endless iterator of end-task dev batches B*_val, one drawn per optimizer step.
    Each micro-batch backward-s one task at a time (one task's activations alive at a time); on the Trainer's
    last micro-batch of a step the weighting completes the step's gradient in .grad, then the Trainer clips and steps.
    self.history holds the weighting's info of every step (alpha; META also the cosines and phi*'s fit); the
    Trainer's logs carry the last step's alpha_k (and cos_k), k in model.heads order. Checkpoints hold the weighting's
    state (resume_from_checkpoint restores it; the aux and dev iterators are the caller's). Under torchrun the body's
    and heads' gradients are averaged over the ranks once per step (META: G and g_meta, through rank 0's phi*);
    give each rank aux iterators of its own (e.g. seeded by the rank)."""

    WEIGHTING = "tartan_weighting.pt"  # the weighting's state_dict, in each checkpoint and save_model's folder

    def __init__(self, *args, weighting: tartan.TaskWeighting, aux: list, dev=None, **kwargs):
        super().__init__(*args, **kwargs)
        if weighting.grad_accum != self.args.gradient_accumulation_steps:
            raise ValueError(f"the weighting accumulates over grad_accum={weighting.grad_accum} micro-batches but "
                             f"the Trainer over gradient_accumulation_steps={self.args.gradient_accumulation_steps}: "
                             f"give both the same number")
        if isinstance(weighting, tartan.MetaWeighting) and dev is None:
            raise ValueError("META's weighting needs dev: an endless iterator of end-task dev batches")
        self.weighting, self.aux, self.dev = weighting, list(aux), dev
        if weighting.scaler is None:  # fp16: the losses are scaled by the Trainer's GradScaler, which unscales .grad
            weighting.scaler = self.accelerator.scaler
        if self.args.world_size > 1:  # torchrun: the weighting averages the body's gradient over the ranks once a
            weighting.group = torch.distributed.group.WORLD  # step (training_step bypasses the DDP wrapper's hooks)
        self.history, self._head_data = [], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        model = self.accelerator.unwrap_model(model)  # under torchrun the Trainer hands in the DDP wrapper
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        with self.accelerator.autocast():  # args.bf16 / fp16, as the Trainer's own forward runs
            features = model.body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            _, end_loss = model.heads[0](features, labels)
        self.weighting.task_backward(0, end_loss)  # unscaled: the weighting divides by grad_accum
        if self._head_data is None:  # phi*'s data: B*_tr of the step's first micro-batch, as tartan.train
            self._head_data = features.detach(), labels
        for k, stream in enumerate(self.aux, 1):
            aux_inputs, aux_labels = tartan.to_device(*next(stream), labels.device)
            with self.accelerator.autocast():
                _, loss = model.heads[k](model.body(**aux_inputs), aux_labels)
            self.weighting.task_backward(k, loss)
        if self.accelerator.sync_gradients:  # the Trainer steps its optimizer after this micro-batch
            if self.current_gradient_accumulation_steps != self.weighting.grad_accum:
                raise ValueError(f"an epoch ended after {self.current_gradient_accumulation_steps} of "
                                 f"{self.weighting.grad_accum} accumulated micro-batches: make the batches per epoch "
                                 f"a multiple of gradient_accumulation_steps (or set dataloader_drop_last and "
                                 f"a dataset that divides), so that every step's weights see a full step")
            if isinstance(self.weighting, tartan.MetaWeighting):
                with self.accelerator.autocast():  # g_meta's pass in the training's precision
                    info = self.weighting.step(self._head_data, tartan.to_device(*next(self.dev), labels.device))
            else:
                info = self.weighting.step()
            self.history.append(info)
            self._head_data = None
            if self.weighting.group is not None:  # torchrun: the heads' gradients averaged over the ranks, as DDP would
                grads = [p.grad for head in model.heads for p in tartan.head_parameters(head, model.body)
                         if p.grad is not None]
                for g, mean in zip(grads, tartan._mean_all_over_ranks(grads, self.weighting.group)):
                    g.copy_(mean)
        return end_loss.detach() / self.weighting.grad_accum  # what the Trainer logs: the end-task's loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with the last step's task weights alpha_k (and META's cos_k) beside the training loss."""
        if self.history and "loss" in logs:
            info = self.history[-1]
            logs = {**logs, **{f"alpha_{k}": a for k, a in enumerate(info["alpha"])},
                    **{f"cos_{k}": c for k, c in enumerate(info.get("cosines") or [])}}
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model as the Trainer saves it, a tensor tied to another (an MLM decoder tied to the body's embedding)
        once only (safetensors refuses shared memory; loading ties it again), and the weighting's state beside it."""
        output_dir = output_dir or self.args.output_dir
        state_dict = self.accelerator.unwrap_model(self.model).state_dict() if state_dict is None else state_dict
        tied = _tied(state_dict)
        super()._save(output_dir, {k: v for k, v in state_dict.items() if k not in tied})
        if self.args.should_save:
            torch.save(self.weighting.state_dict(), os.path.join(output_dir, self.WEIGHTING))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The model as the Trainer loads it, and the weighting's w and step count (resume_from_checkpoint)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = os.path.join(resume_from_checkpoint, self.WEIGHTING)
        if os.path.isfile(saved):
            self.weighting.load_state_dict(torch.load(saved, weights_only=True))

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's warnings on loading a checkpoint, less the tied tensors (saved once, under the first name)."""
        tied = _tied(self.accelerator.unwrap_model(self.model).state_dict())
        super()._issue_warnings_after_load(load_result._replace(missing_keys=[
            k for k in load_result.missing_keys if k not in tied]))


def _tied(state_dict: dict) -> set:
    """The names of tensors that share memory with one named before them (a tied MLM decoder's weight and bias)."""
    seen, tied = set(), set()
    for key, value in state_dict.items():
        if value.numel() and value.data_ptr() in seen:
            tied.add(key)
        seen.add(value.data_ptr())
    return tied
