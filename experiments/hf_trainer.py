"""TARTAN's task weighting inside a Hugging Face Trainer: a Trainer subclass whose training_step hands each task's
loss to a tartan weighting (tartan.MTWeighting for Eq. 3, tartan.MetaWeighting for Algorithm 1) instead of
backward-ing one loss. The Trainer keeps everything else: its optimizer and schedule, clipping, logging, and gradient
accumulation, which the weighting follows (one weight update per optimizer step, g_k the mean over the step's
micro-batches). experiments/test_hf_trainer.py drives it with a tiny BERT built from a config."""
from __future__ import annotations

import torch.nn as nn
import transformers

import tartan


class MultiTaskModel(nn.Module):
    """The shared body (tartan.HFBody) and one head per task, end-task first, as one module, so that the Trainer's
    optimizer holds all of them. forward is the end-task's (for the Trainer's evaluation and prediction)."""

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
    self.history holds the weighting's info of every step (alpha; META also the cosines and phi*'s fit)."""

    def __init__(self, *args, weighting: tartan.TaskWeighting, aux: list, dev=None, **kwargs):
        super().__init__(*args, **kwargs)
        if weighting.grad_accum != self.args.gradient_accumulation_steps:
            raise ValueError(f"the weighting accumulates over grad_accum={weighting.grad_accum} micro-batches but "
                             f"the Trainer over gradient_accumulation_steps={self.args.gradient_accumulation_steps}: "
                             f"give both the same number")
        if isinstance(weighting, tartan.MetaWeighting) and dev is None:
            raise ValueError("META's weighting needs dev: an endless iterator of end-task dev batches")
        self.weighting, self.aux, self.dev = weighting, list(aux), dev
        self.history, self._head_data = [], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        features = model.body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        _, end_loss = model.heads[0](features, labels)
        self.weighting.task_backward(0, end_loss)  # unscaled: the weighting divides by grad_accum
        if self._head_data is None:  # phi*'s data: B*_tr of the step's first micro-batch, as tartan.train
            self._head_data = features.detach(), labels
        for k, stream in enumerate(self.aux, 1):
            aux_inputs, aux_labels = tartan.to_device(*next(stream), labels.device)
            _, loss = model.heads[k](model.body(**aux_inputs), aux_labels)
            self.weighting.task_backward(k, loss)
        if self.accelerator.sync_gradients:  # the Trainer steps its optimizer after this micro-batch
            if self.current_gradient_accumulation_steps != self.weighting.grad_accum:
                raise ValueError(f"an epoch ended after {self.current_gradient_accumulation_steps} of "
                                 f"{self.weighting.grad_accum} accumulated micro-batches: make the batches per epoch "
                                 f"a multiple of gradient_accumulation_steps (or set dataloader_drop_last and "
                                 f"a dataset that divides), so that every step's weights see a full step")
            if isinstance(self.weighting, tartan.MetaWeighting):
                info = self.weighting.step(self._head_data, tartan.to_device(*next(self.dev), labels.device))
            else:
                info = self.weighting.step()
            self.history.append(info)
            self._head_data = None
        return end_loss.detach() / self.weighting.grad_accum  # what the Trainer logs: the end-task's loss
