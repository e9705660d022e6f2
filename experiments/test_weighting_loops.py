"""tartan.MTWeighting and tartan.MetaWeighting inside loops that do more than the README's (issue 30): a gradient the
weighting did not put there or that was lost, parameters unfrozen later, short head_data, mixed precision (bf16
autocast, fp16's GradScaler), the forms of val, and saving and resuming a weighting. A plain torch body on tensors."""
import contextlib
import io
import warnings

import pytest
import torch
import torch.nn as nn

import tartan

H = 16


def setup(meta, grad_accum=2, seed=0, **cfg):
    """A two-layer body, an end-task (2 classes) and an auxiliary task (3 classes), and their weighting."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(8, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())
    heads = nn.ModuleList([tartan.ClassificationHead(H, 2, dropout=0.0), tartan.ClassificationHead(H, 3, dropout=0.0)])
    cfg = tartan.MetaConfig(**{"meta_batch_size": 8, "grad_accum": grad_accum, "meta_lr": 0.5, **cfg})
    weighting = tartan.MetaWeighting(body, 2, 2, cfg) if meta else tartan.MTWeighting(body, 2, grad_accum=grad_accum)
    return body, heads, weighting


def data(step, micro, n=8):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long(), x[:, 1:4].argmax(1)


def val_batch(step):
    x, y, _ = data(step, 99, 16)
    return x, y


def micro_batch(weighting, body, heads, step, micro, meta, amp=contextlib.nullcontext(), backward_in_amp=True):
    """One micro-batch of both tasks, as the README's loop: weighting.backward, inside `amp` or after it."""
    x, y, y_aux = data(step, micro)
    with amp:
        features = body(x)
        losses = [heads[0](features, y)[1], heads[1](body(x), y_aux)[1]]
        kwargs = dict(head_data=(features, y), val=val_batch(step)) if meta else {}
        if backward_in_amp:
            return weighting.backward(losses, **kwargs)
    return weighting.backward(losses, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# no silent wrong gradient


@pytest.mark.parametrize("meta", [True, False])
def test_a_backward_of_your_own_within_a_step_is_refused(meta):
    """A regulariser backward-ed by the loop on a step's 2nd micro-batch went into the body's .grad unseen (111% off
    under MT, 55% under META): now the weighting's next call raises."""
    body, heads, weighting = setup(meta)
    micro_batch(weighting, body, heads, 0, 0, meta)
    body(data(0, 1)[0]).pow(2).mean().backward()  # the loop's own regulariser
    with pytest.raises(ValueError, match="the body's .grad changed between this (MT|Meta)Weighting's calls in step 1 "
                                         "\\(a backward of your own, or zero_grad\\(\\) within the step\\)"):
        micro_batch(weighting, body, heads, 0, 1, meta)


@pytest.mark.parametrize("meta", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_at_every_micro_batch_is_refused(meta, set_to_none):
    """zero_grad() at the top of every micro-batch dropped the step's earlier micro-batches (66% off under MT, 50%
    under META): now the call after it raises, naming where to zero gradients."""
    body, heads, weighting = setup(meta)
    for micro in range(2):
        body.zero_grad(set_to_none=set_to_none), heads.zero_grad(set_to_none=set_to_none)
        if micro == 1:
            with pytest.raises(ValueError, match="zero gradients only after the optimizer step"):
                micro_batch(weighting, body, heads, 0, micro, meta)
        else:
            micro_batch(weighting, body, heads, 0, micro, meta)


@pytest.mark.parametrize("meta", [True, False])
def test_a_gradient_lost_before_step_is_refused(meta):
    """task_backward for each task, then zero_grad() before step(): step() raises rather than weighting nothing."""
    body, heads, weighting = setup(meta, grad_accum=1)
    x, y, y_aux = data(0, 0)
    weighting.task_backward(0, heads[0](body(x), y)[1])
    weighting.task_backward(1, heads[1](body(x), y_aux)[1])
    body.zero_grad()
    with pytest.raises(ValueError, match="changed between this"):
        weighting.step(head_data=(body(x), y), val=val_batch(0)) if meta else weighting.step()


def test_meta_frees_a_task_gradient_once_it_is_in_g():
    """Remembering what the weighting left must not keep a task's gradient alive after it moved into G: during the
    next task's backward the previous task's .grad tensors are already freed (P floats of peak memory)."""
    import weakref
    body, heads, weighting = setup(True, grad_accum=1)
    x, y, y_aux = data(0, 0)
    weighting.task_backward(0, heads[0](body(x), y)[1])
    moved, alive = weakref.ref(body[0].weight.grad), []
    hook = body[0].weight.register_hook(lambda g: alive.append(moved() is not None))
    weighting.task_backward(1, heads[1](body(x), y_aux)[1])
    hook.remove()
    assert alive == [False]


def reference_grads(body, heads, step, grad_accum, params):
    """Each task's body gradient g_k (the mean over the step's micro-batches), computed apart from the weighting."""
    g = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for micro in range(grad_accum):
        x, y, y_aux = data(step, micro)
        for k, (head, labels) in enumerate(zip(heads, (y, y_aux))):
            for acc, d in zip(g[k], torch.autograd.grad(head(body(x), labels)[1], params)):
                acc += d / grad_accum
    return g


@pytest.mark.parametrize("meta", [True, False])
def test_a_layer_unfrozen_later_is_weighted_like_the_rest(meta):
    """A layer frozen when the weighting was built and unfrozen later got the unweighted sum of the task gradients
    under META: now it is picked up at the next step and gets sum_k alpha_k g_k, as every body parameter; changing
    requires_grad within a step is refused."""
    body, heads, weighting = setup(meta)
    for p in body[0].parameters():
        p.requires_grad_(False)
    weighting = tartan.MetaWeighting(body, 2, 2, weighting.cfg) if meta else weighting.__class__(body, 2, grad_accum=2)
    for micro in range(2):
        info = micro_batch(weighting, body, heads, 0, micro, meta)
    body.zero_grad(), heads.zero_grad()
    for p in body[0].parameters():  # unfrozen between optimizer steps
        p.requires_grad_(True)
    for micro in range(2):
        info = micro_batch(weighting, body, heads, 1, micro, meta)
    params = list(body.parameters())
    g = reference_grads(body, heads, 1, 2, params)
    for i, p in enumerate(params):
        want = info["alpha"][0] * g[0][i] + info["alpha"][1] * g[1][i]
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    if meta:
        assert info["alpha"] != pytest.approx([0.5, 0.5])
    body.zero_grad(), heads.zero_grad()
    micro_batch(weighting, body, heads, 2, 0, meta)
    body[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad of a body parameter changed within step 3: freeze or "
                                         "unfreeze parameters between optimizer steps"):
        micro_batch(weighting, body, heads, 2, 1, meta)


def test_head_data_shorter_than_meta_batch_size_warns_once():
    """phi* was fitted on 16 rows with meta_batch_size 64, silently: now one warning, at the first such step."""
    body, heads, weighting = setup(True, grad_accum=1, meta_batch_size=64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(3):
            assert micro_batch(weighting, body, heads, step, 0, True) is not None
            body.zero_grad(), heads.zero_grad()
    short = [w for w in seen if "fewer than meta_batch_size" in str(w.message)]
    assert len(short) == 1 and "head_data has 8 rows, fewer than meta_batch_size=64" in str(short[0].message)


def test_meta_without_a_config_steps_at_every_call_as_mt():
    """MetaWeighting without a config took MetaConfig's grad_accum=2 (MTWeighting's default is 1): its first call
    quietly returned None. Now both step at every call unless told otherwise."""
    body, heads, _ = setup(True)
    weighting = tartan.MetaWeighting(body, 2, 2)
    assert weighting.grad_accum == 1 and micro_batch(weighting, body, heads, 0, 0, True)["alpha"]


# ---------------------------------------------------------------------------------------------------------------------
# val's forms


def test_val_may_be_a_tensor_batch_and_a_wrong_val_is_named():
    """val=(x, y) as tensors gave "'Tensor' object has no attribute 'items'": a tensor is now the body's one input, as
    in the README's loop, with the same weights as the callable form; a callable returning the head's (logits, loss)
    gave torch's "grad can be implicitly created only for scalar outputs", and one computed under torch.no_grad
    torch's "element 0 of tensors does not require grad": now messages naming the fix."""
    alphas = []
    for form in ("tensors", "callable"):
        body, heads, weighting = setup(True, grad_accum=1)
        x, y, y_aux = data(0, 0)
        features = body(x)
        xv, yv = val_batch(0)
        val = (xv, yv) if form == "tensors" else (lambda head: head(body(xv), yv)[1])
        torch.manual_seed(1)  # phi*'s initialisation
        alphas.append(weighting.backward([heads[0](features, y)[1], heads[1](body(x), y_aux)[1]],
                                         head_data=(features, y), val=val)["alpha"])
    assert alphas[0] == alphas[1] != pytest.approx([0.5, 0.5])
    for val, message in [(lambda head: head(body(xv), yv), "val\\(head\\) must return the validation loss alone, a "
                                                           "scalar tensor, not tuple .*return head\\(...\\)\\[1\\]"),
                         ({"x": xv}, "META's step needs val: an end-task dev batch \\(inputs, labels\\).*not dict"),
                         (torch.no_grad()(lambda head: head(body(xv), yv)[1]), "val\\(head\\)'s loss has no graph: "
                                                                               "g_meta needs it \\(no torch.no_grad")]:
        body, heads, weighting = setup(True, grad_accum=1)
        with pytest.raises((TypeError, ValueError), match=message):
            weighting.backward([heads[0](body(x), y)[1], heads[1](body(x), y_aux)[1]], head_data=(body(x), y),
                               val=val)


@pytest.mark.parametrize("cut", ["no_grad", "detach"])
def test_a_val_that_does_not_reach_the_body_is_refused(cut):
    """A val(head) whose body forward ran under torch.no_grad, or whose features were detached, still had a graph
    through phi*: g_meta was 0, every cosine 0, and META quietly became MT with equal weights. Now it raises."""
    body, heads, weighting = setup(True, grad_accum=1)
    x, y, y_aux = data(0, 0)
    xv, yv = val_batch(0)

    def val(head):
        if cut == "no_grad":
            with torch.no_grad():
                features = body(xv)
        else:
            features = body(xv).detach()
        return head(features, yv)[1]
    with pytest.raises(ValueError, match="val's loss does not reach the body: g_meta needs the body's forward with a "
                                         r"graph \(no torch.no_grad or detach around body"):
        weighting.backward([heads[0](body(x), y)[1], heads[1](body(x), y_aux)[1]], head_data=(body(x), y), val=val)


def test_meta_refuses_a_body_that_holds_the_heads():
    """Heads registered inside the module given as the body became body parameters: each head got alpha_k times its
    own gradient, and the heads' gradients entered the cosines. MT is unaffected (w_k scales heads too, Eq. 3)."""
    body, heads, weighting = setup(True)
    both = nn.ModuleDict({"trunk": body, "heads": heads})
    with pytest.raises(ValueError, match="the body holds a task head: META would weight the heads' gradients"):
        tartan.MetaWeighting(both, 2, 2, weighting.cfg)
    tartan.MTWeighting(both, 2)


@pytest.mark.parametrize("meta", [True, False])
def test_an_optimizer_step_before_the_weighting_returns_is_refused(meta):
    """A loop that stepped its optimizer before the weighting's step was complete (a partial accumulation at an
    epoch's end, or MetaConfig's default grad_accum=2 unnoticed) went on as if nothing had happened, its next step
    blaming a backward of the user's own. Now the next call names it."""
    body, heads, weighting = setup(meta)
    opt = torch.optim.SGD([*body.parameters(), *heads.parameters()], lr=0.1)
    assert micro_batch(weighting, body, heads, 0, 0, meta) is None
    opt.step(), opt.zero_grad()
    with pytest.raises(ValueError, match="the body's parameters changed within step 1: step the optimizer only when "
                                         r"the (MT|Meta)Weighting returns the step's info \(its grad_accum=2-th call"):
        micro_batch(weighting, body, heads, 0, 1, meta)


def test_meta_step_inside_torch_no_grad_is_the_same_step():
    """step() called within torch.no_grad (a loop's own wrapper) died in phi*'s fit with torch's "element 0 of
    tensors does not require grad": phi*'s fit and g_meta now take autograd back, and give the same weights."""
    alphas = []
    for no_grad in (False, True):
        body, heads, weighting = setup(True, grad_accum=1)
        x, y, y_aux = data(0, 0)
        for k, (head, labels) in enumerate(zip(heads, (y, y_aux))):
            weighting.task_backward(k, head(body(x), labels)[1])
        torch.manual_seed(3)
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            alphas.append(weighting.step(head_data=(body(x), y), val=val_batch(0))["alpha"])
    assert alphas[0] == alphas[1] != pytest.approx([0.5, 0.5])


def test_a_body_cast_after_building_is_picked_up():
    """META built on a float32 body that is then cast to float64 in place (parameters keep their identity) stopped
    at the cosine with torch's "addmv input tensors must have the same dtype": G now follows the body's dtype at the
    next step, and the body's gradient is sum_k alpha_k g_k in float64."""
    body, heads, weighting = setup(True, grad_accum=1)
    body.double(), heads.double()
    x, y, y_aux = (t.double() if t.is_floating_point() else t for t in data(0, 0))
    xv, yv = val_batch(0)
    features = body(x)
    losses = [heads[0](features, y)[1], heads[1](body(x), y_aux)[1]]
    g = [torch.autograd.grad(loss, list(body.parameters()), retain_graph=True) for loss in losses]
    info = weighting.backward(losses, head_data=(features, y), val=(xv.double(), yv))
    assert weighting.G.dtype == torch.float64 and info["alpha"] != pytest.approx([0.5, 0.5])
    for p, g0, g1 in zip(body.parameters(), *g):
        torch.testing.assert_close(p.grad, info["alpha"][0] * g0 + info["alpha"][1] * g1)


def test_a_sparse_embedding_and_a_positional_grad_accum_are_named():
    """A body with nn.Embedding(sparse=True) failed in torch ("reshape is not implemented for sparse tensors");
    MTWeighting(body, 2, 2), meant as grad_accum=2, with "object of type 'int' has no len()"."""
    body = nn.Sequential(nn.Embedding(10, H, sparse=True), nn.Tanh())
    for build in (lambda: tartan.MTWeighting(body, 2), lambda: tartan.MetaWeighting(body, 2, 2)):
        with pytest.raises(TypeError, match="an embedding with sparse=True: the weighting needs dense gradients"):
            build()
    with pytest.raises(TypeError, match=r"weights=2: one number per task \(grad_accum is given by name"):
        tartan.MTWeighting(setup(False)[0], 2, 2)


# ---------------------------------------------------------------------------------------------------------------------
# mixed precision


class Float(nn.Module):
    def forward(self, x):
        return x.float()


@pytest.mark.parametrize("float_features", [False, True])
@pytest.mark.parametrize("inside", [True, False])
def test_bf16_autocast_with_backward_inside_or_outside_the_block(inside, float_features):
    """weighting.backward inside the autocast block gave a dtype error at alpha @ G; inside or outside, META now
    gives the body sum_k alpha_k g_k in the parameters' dtype, and g_meta's pass runs under the training's bf16
    autocast (unless amp says otherwise). Also where the body's features come out in float32 under autocast (as an
    encoder's final LayerNorm on CUDA): with backward after the block, g_meta's pass ran without autocast."""
    seen = []

    def val(body):
        def loss(head):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            x, y = val_batch(0)
            return head(body(x), y)[1]
        return loss
    for amp in (None, contextlib.nullcontext()):
        body, heads, weighting = setup(True, grad_accum=1)
        if float_features:
            body.append(Float())
        weighting.amp = amp
        x, y, y_aux = data(0, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = body(x)
            losses = [heads[0](features, y)[1], heads[1](body(x), y_aux)[1]]
            g = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(body.parameters()),
                                                                       retain_graph=True)]) for loss in losses]
            if inside:
                info = weighting.backward(losses, head_data=(features, y), val=val(body))
        if not inside:
            info = weighting.backward(losses, head_data=(features, y), val=val(body))
        assert all(p.grad.dtype == torch.float32 for p in body.parameters()) and not info["skipped"]
        flat = torch.cat([p.grad.reshape(-1) for p in body.parameters()])
        torch.testing.assert_close(flat, info["alpha"][0] * g[0].float() + info["alpha"][1] * g[1].float())
    assert seen == [torch.bfloat16, False]


@pytest.mark.parametrize("meta", [True, False])
def test_bf16_parameters_without_autocast(meta):
    """A body and heads cast to bf16 (pure bf16 training, no autocast) stopped META at cos(g_meta, g_k) with torch's
    "addmv input tensors must have the same dtype": now g_meta is in G's float32, the body's .grad in the parameters'
    bf16, and it is sum_k alpha_k g_k (MT: with alpha = w) to bf16's precision."""
    body, heads, weighting = setup(meta, grad_accum=1)
    body.to(torch.bfloat16), heads.to(torch.bfloat16)
    weighting = tartan.MetaWeighting(body, 2, 2, weighting.cfg) if meta else tartan.MTWeighting(body, 2)
    x, y, y_aux = data(0, 0)
    features = body(x.bfloat16())
    losses = [heads[0](features, y)[1], heads[1](body(x.bfloat16()), y_aux)[1]]
    g = [torch.autograd.grad(loss, list(body.parameters()), retain_graph=True) for loss in losses]
    xv, yv = val_batch(0)
    info = weighting.backward(losses, head_data=(features, y), val=(xv.bfloat16(), yv)) if meta else \
        weighting.backward(losses)
    assert meta == (info["alpha"] != pytest.approx([0.5, 0.5])) and not info.get("skipped")
    for p, g0, g1 in zip(body.parameters(), *g):
        assert p.grad.dtype == torch.bfloat16
        want = info["alpha"][0] * g0.double() + info["alpha"][1] * g1.double()
        torch.testing.assert_close(p.grad.double(), want, rtol=2e-2, atol=1e-3)


def test_fp16_grad_scaler_skipped_steps_leave_w_untouched():
    """A GradScaler step that overflows made w [nan, nan] for good: now a step whose body gradient overflowed says
    skipped=True and leaves w and alpha as they were; a step the scaler skipped for a head's overflow alone is undone
    at the next step (the scaler's scale went down). Over the run, w moved by eta * cos of exactly the steps the
    optimizer took. fp16 autocast on the CPU; the scale starts so high that the first steps overflow."""
    body, heads, _ = setup(True, grad_accum=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    weighting = tartan.MetaWeighting(body, 2, 2, tartan.MetaConfig(meta_batch_size=8, grad_accum=1, meta_lr=0.5),
                                     scaler=scaler)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    w, taken, head_only = weighting.w.clone(), [], 0
    for step in range(16):
        before = [p.detach().clone() for p in body.parameters()]
        info = micro_batch(weighting, body, heads, step, 0, True, torch.autocast("cpu", dtype=torch.float16))
        scaler.step(opt), scaler.update(), opt.zero_grad()
        moved = any(not torch.equal(a, p) for a, p in zip(before, body.parameters()))
        assert torch.isfinite(weighting.w).all() and not (moved and info["skipped"])
        if info["skipped"]:
            assert torch.equal(weighting.w, w) and info["alpha"] == torch.softmax(w, 0).tolist()
        else:
            assert max(info["losses"]) < 5  # the losses unscaled
            head_only += not moved
        if moved:
            taken.append(info["cosines"])
        w = weighting.w.clone()
    assert len(taken) >= 3 and taken[-1] == info["cosines"] and head_only >= 1  # the case undone at the next step
    assert weighting.w.tolist() == pytest.approx((0.5 + 0.5 * torch.tensor(taken, dtype=torch.float64).sum(0)).tolist())


def test_fp16_g_meta_is_scaled_as_the_task_gradients():
    """Under fp16 with a GradScaler, G comes from scaled losses but g_meta's pass backpropagated the unscaled
    validation loss in fp16: small gradients underflowed to 0 (here every entry of the first layer's, of an 8-layer
    body). g_meta is now scaled as the g_k (the cosines do not depend on the scale), and matches float32's."""
    torch.manual_seed(0)
    body = nn.Sequential(*[m for i in range(8) for m in (nn.Linear(8 if i == 0 else H, H), nn.Tanh())])
    for layer in body[::2]:
        nn.init.normal_(layer.weight, std=0.03)
    head, (xv, yv), params = tartan.ClassificationHead(H, 2, dropout=0.0), val_batch(0), list(body.parameters())
    exact, _ = tartan.meta_gradient(body, head, (xv, yv), params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled, _ = tartan.meta_gradient(body, head, (xv, yv), params, torch.autocast("cpu", dtype=torch.float16), scaler)
    unscaled, _ = tartan.meta_gradient(body, head, (xv, yv), params, torch.autocast("cpu", dtype=torch.float16))
    first = params[0].numel()
    assert (exact[:first] != 0).all() and (unscaled[:first] == 0).all()  # what fp16 loses without the scale
    for part in (slice(None), slice(first)):  # the whole g_meta, and the first layer's part of it
        error = (scaled[part] / 2.0 ** 16 - exact[part]).norm() / exact[part].norm()
        assert error < 1e-2, (part, error)


def fp16_run(steps, saved=None, save_after=None):
    """The fp16 loop above, continued from `saved` (a round trip through torch.save, weights_only), or saved after
    step `save_after`. Returns (w, the steps the scaler skipped for a head's overflow alone) or the saved state."""
    body, heads, _ = setup(True, grad_accum=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    weighting = tartan.MetaWeighting(body, 2, 2, tartan.MetaConfig(meta_batch_size=8, grad_accum=1, meta_lr=0.5),
                                     scaler=scaler)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    parts = {"body": body, "heads": heads, "opt": opt, "scaler": scaler, "weighting": weighting}
    if saved is not None:
        saved = torch.load(io.BytesIO(saved), weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        torch.set_rng_state(saved["rng"])
    head_only = []
    for step in range(0 if saved is None else saved["next"], steps):
        before = [p.detach().clone() for p in body.parameters()]
        info = micro_batch(weighting, body, heads, step, 0, True, torch.autocast("cpu", dtype=torch.float16))
        scaler.step(opt), scaler.update(), opt.zero_grad()
        if not info["skipped"] and all(torch.equal(a, p) for a, p in zip(before, body.parameters())):
            head_only.append(step)
        if step == save_after:
            buffer = io.BytesIO()
            torch.save({**{name: part.state_dict() for name, part in parts.items()}, "rng": torch.get_rng_state(),
                        "next": step + 1}, buffer)
            return buffer.getvalue()
    return weighting.w.clone(), head_only


def test_fp16_a_run_saved_after_a_skipped_step_resumes_to_the_same_weights():
    """Saved right after a step that the GradScaler skipped for a head's overflow alone, a resumed META run kept
    that step's change of w, which an unbroken run undoes at the next step: the weighting's state now holds the
    scale and w that the undo needs, and the resumed run ends with the unbroken run's w."""
    whole, head_only = fp16_run(16)
    assert head_only
    resumed, _ = fp16_run(16, saved=fp16_run(16, save_after=head_only[0]))
    assert torch.equal(resumed, whole)


def test_mt_with_a_grad_scaler_reports_unscaled_losses():
    body, heads, _ = setup(False, grad_accum=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weighting = tartan.MTWeighting(body, 2, scaler=scaler)
    info = micro_batch(weighting, body, heads, 0, 0, False)
    x, y, y_aux = data(0, 0)
    assert info["losses"] == pytest.approx([heads[0](body(x), y)[1].item(), heads[1](body(x), y_aux)[1].item()])
    g = torch.autograd.grad(heads[0](body(x), y)[1] / 2 + heads[1](body(x), y_aux)[1] / 2, body[0].weight)[0]
    torch.testing.assert_close(body[0].weight.grad, 1024 * g)


# ---------------------------------------------------------------------------------------------------------------------
# state


def run(meta, steps, start=0, saved=None):
    """`steps` optimizer steps from step `start`, from a saved state if given; returns the state after them."""
    body, heads, weighting = setup(meta)
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-2)
    if saved is not None:
        body.load_state_dict(saved["body"]), heads.load_state_dict(saved["heads"])
        opt.load_state_dict(saved["opt"]), weighting.load_state_dict(saved["weighting"])
        torch.set_rng_state(saved["rng"])  # phi*'s initialisations
    for step in range(start, start + steps):
        for micro in range(2):
            info = micro_batch(weighting, body, heads, step, micro, meta)
        opt.step(), opt.zero_grad()
    return {"body": body.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
            "weighting": weighting.state_dict(), "rng": torch.get_rng_state(), "alpha": info["alpha"]}


@pytest.mark.parametrize("meta", [True, False])
def test_a_weighting_saved_mid_run_resumes_to_the_same_weights(meta, tmp_path):
    torch.manual_seed(5)
    whole = run(meta, 6)
    torch.manual_seed(5)
    torch.save(run(meta, 3), tmp_path / "state.pt")
    resumed = run(meta, 3, 3, torch.load(tmp_path / "state.pt", weights_only=False))
    assert resumed["weighting"]["steps"] == whole["weighting"]["steps"] == 6
    assert torch.equal(resumed["weighting"]["w"], whole["weighting"]["w"]) and resumed["alpha"] == whole["alpha"]
    if meta:
        assert whole["alpha"] != pytest.approx([0.5, 0.5])
    body, heads, weighting = setup(meta)
    micro_batch(weighting, body, heads, 0, 0, meta)
    with pytest.raises(ValueError, match="state_dict\\(\\) within an optimizer step: save after the step"):
        weighting.state_dict()
    with pytest.raises(ValueError, match="a saved weighting of 3 tasks into one of 2"):
        weighting.load_state_dict({"w": [0.2, 0.3, 0.5], "steps": 1})
    with pytest.raises(ValueError, match="load_state_dict\\(\\) within an optimizer step: load before the step"):
        weighting.load_state_dict(whole["weighting"])
    other = setup(not meta)[2]
    with pytest.raises(ValueError, match=f"load_state_dict\\(\\) of a {type(other).__name__} got a "
                                         f"{type(weighting).__name__}'s state: MT's w are Eq. 3's weights"):
        other.load_state_dict(whole["weighting"])
