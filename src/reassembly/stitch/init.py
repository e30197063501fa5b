"""Least-squares initialisation of a reassembled network from probe images, in closed form.

Every linear map the network adds is fitted by ridge regression on features of the same probe images:

* the stem's convolution maps image patches to what the first block's own model feeds that block (its tensor at
  the block's input point, read through :func:`reassembly.graph.tap`); its batch-norm is set so that, on the probe,
  it adds the fitted intercept and nothing else;
* each stitch maps the network's own features arriving at it (stem and earlier stitches already fitted, so errors
  do not compound unseen) to what the next block's own model feeds that block: the stitch's norm is set to
  standardise the arriving features, the projection is the ridge solution on the standardised features to the
  target itself, with its intercept as the projection's bias (the LeakyReLU after it is left out of the fit:
  fitting the exact inverse, which stretches negative targets tenfold, gave a worse network, 68.2% against 71.9%
  top-1 before training on the three-architecture example of ``benchmarks/bench_stitch.py``);
* a learned class token is set to the mean class token the next block's model produces;
* the head is a ridge classifier (one-hot targets) on the pooled features, when labels are given; its penalty and
  temperature are chosen on a fifth of the probe held out from the fit (``head="zero"`` zeroes it instead);
* with ``recalibrate_norms`` (the default), each pretrained block's batch-norm statistics are first re-estimated on
  what the network feeds that block on the probe, so that everything downstream is fitted to the block as training
  will see it: training normalises by batch statistics of the target data, not by the source data's running
  statistics (``benchmarks/stitch_mode_gap.py`` measures what the mismatch costs).

Without the last two, full fine-tuning of the 1.5M Split-CIFAR network started from a training loss of 9.7 and
reached 77.2 % on the validation split; ``benchmarks/init_study.py`` measures the variants (``results/init-study``).

DeRy itself uses PyTorch's default initialisation (``init="default"``); this is the library's addition, and
``benchmarks/bench_stitch.py`` measures what it buys before any training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import normalization_of, normalize
from ..graph import tap
from .layers import End, Stitch, grid_of, resize, tokens_to_map
from .net import ReassembledNet, Stem

RIDGE = 1e-3  # times the mean eigenvalue of the input covariance
PARTS = ("stem", "stitches", "head")
HEAD_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # candidate head penalties, times the mean eigenvalue
HEADS = ("fit", "zero")


class RidgeFit:
    """Streaming ridge regression with intercept: ``add`` rows of inputs and targets, then ``solve``."""

    def __init__(self, inputs: int, outputs: int):
        self.xx = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.xy = torch.zeros(inputs, outputs, dtype=torch.float64)
        self.x = torch.zeros(inputs, dtype=torch.float64)
        self.y = torch.zeros(outputs, dtype=torch.float64)
        self.yy = 0.0  # sum of squared targets, for the residual
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.x += x.sum(0)
        self.y += y.sum(0)
        self.yy += float((y * y).sum())
        self.n += x.shape[0]

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the inputs."""
        mean = self.x / self.n
        return mean, self.xx / self.n - torch.outer(mean, mean)

    def solve(self, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, c)`` minimising ``|x W^T + c - y|^2 + lambda |W|^2``; W is (outputs, inputs)."""
        mean_x, cov = self.covariance()
        mean_y = self.y / self.n
        cross = self.xy / self.n - torch.outer(mean_x, mean_y)
        penalty = ridge * max(float(cov.diagonal().mean()), 1e-12)
        weight = torch.linalg.solve(cov + penalty * torch.eye(len(cov), dtype=cov.dtype), cross).T
        return weight, mean_y - weight @ mean_x

    def residual(self, weight: torch.Tensor) -> float:
        """The fit's squared error over the targets' variance about their mean, on the rows seen (0 = exact, 1 = no
        better than predicting the mean), from the accumulated moments."""
        mean_x, cov = self.covariance()
        mean_y = self.y / self.n
        cross = self.xy / self.n - torch.outer(mean_x, mean_y)
        total = self.yy / self.n - float(mean_y @ mean_y)
        error = total - 2 * float((weight * cross.T).sum()) + float(((weight @ cov) * weight).sum())
        return error / max(total, 1e-12)


def _as_map(x: torch.Tensor, end: End) -> torch.Tensor:
    """A point's tensor laid out as ``end``, as an NCHW map (tokens on their grid, prefix tokens dropped)."""
    if end.format == "nhwc":
        return x.permute(0, 3, 1, 2)
    if end.format == "tokens":
        return tokens_to_map(x, end, grid_of(x, end))
    return x


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C); tokens (N, T, D) -> (N*T, D)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.ndim == 4 else x.reshape(-1, x.shape[-1])


def _patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Convolution input rows: (N * out positions, C * kernel * kernel), in Conv2d's weight order."""
    if kernel == stride and padding == 0:  # non-overlapping patches: a reshape, much faster than im2col
        n, c, h, w = x.shape
        x = x[:, :, : h - h % kernel, : w - w % kernel]
        tiles = x.reshape(n, c, h // kernel, kernel, w // kernel, kernel).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(-1, c * kernel * kernel)
    columns = F.unfold(x, kernel, padding=padding, stride=stride)  # (N, C*k*k, L)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


class _Targets:
    """What each block's own model feeds it on the probe images, computed batch by batch through the taps and kept
    (in ``cache``, by model, node and batch, to share with other fits)."""

    def __init__(self, blocks, images: torch.Tensor, cache: dict | None = None):
        self.blocks, self.images = blocks, images
        self.cache = cache if cache is not None else {}

    def __call__(self, k: int, first: int, stop: int) -> torch.Tensor:
        source = self.blocks[k]
        key = (source.ref.source, source.ref.start, first, stop)
        if key not in self.cache:
            mean, std = normalization_of(source.model)
            x = _channels_last([normalize(self.images[first:stop], mean, std)])[0]
            self.cache[key] = tap(source.chain, x, [source.ref.start], pool=False)[source.ref.start]
        return self.cache[key]


class _Flow:
    """The network's tensors after block k on every probe batch, carried forward one stitch and block at a time:
    each stitch is fitted on what arrives at it once everything upstream is fitted, and nothing upstream runs
    again. ``carried`` tensors (other images) go the same way, fitting and recalibrating nothing: after the last
    block they are what the fitted network computes for them up to its head."""

    def __init__(self, net: ReassembledNet, tensors: list[torch.Tensor], carried: list[torch.Tensor],
                 recalibrate_norms: bool = False):
        self.net, self.block, self.recalibrate_norms, self.recalibrated = net, -1, recalibrate_norms, 0
        self.tensors, self.carried = _channels_last(tensors), _channels_last(carried)

    def after(self, k: int) -> list[torch.Tensor]:
        net = self.net
        while self.block < k:
            self.block += 1
            b = self.block
            enter = net.stem if b == 0 else net.stitches[b - 1]
            entering = [enter(x) for x in self.tensors]
            if self.recalibrate_norms:
                self.recalibrated += recalibrate_batch_norms(net.blocks[b], entering)
            self.tensors = [net.blocks[b](x) for x in entering]
            self.carried = [net.blocks[b](enter(x)) for x in self.carried]
        return self.tensors


def _channels_last(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Maps in NHWC memory layout (the same values): convolutions then run about twice as fast on CPU for the
    MobileNet blocks (``benchmarks/bench_train_step.py``); tokens are left as they are."""
    return [x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in tensors]


class FitCache:
    """What fitting many networks on one probe can share (the search fits every candidate): each block's target,
    by model and node, and, for every prefix of block specs, the fitted stem and stitches, the blocks' recalibrated
    batch-norm statistics and the tensors after the prefix. A network whose first blocks were fitted before
    starts after them. Only the prefixes of the last network are kept, so fit networks in lexicographic order of
    their blocks; results equal fitting each network alone."""

    def __init__(self, images: torch.Tensor, carried: torch.Tensor | None = None):
        self.images, self.carried = images, carried
        self.targets: dict = {}
        self.prefixes: dict[tuple[str, ...], dict] = {}

    def restore(self, net: ReassembledNet, flow: _Flow, specs: tuple[str, ...], fits: list) -> int:
        """Load the longest fitted prefix of ``specs`` into ``net`` and ``flow``; returns its number of blocks."""
        length = max((len(key) for key in self.prefixes if specs[: len(key)] == key), default=0)
        if length:
            saved = self.prefixes[specs[:length]]
            for module, state in zip(_prefix_modules(net, length), saved["states"]):
                module.load_state_dict(state, strict=False)
            flow.tensors, flow.carried, flow.recalibrated = saved["tensors"], saved["carried"], saved["recalibrated"]
            flow.block = length - 1
            fits.extend(saved["fits"])
        return length

    def store(self, net: ReassembledNet, flow: _Flow, specs: tuple[str, ...], fits: list) -> None:
        self.prefixes = {key: value for key, value in self.prefixes.items() if specs[: len(key)] == key}
        states = [{name: tensor.clone() for name, tensor in
                   (module.state_dict().items() if kind == "fitted" else
                    ((n, b) for n, b in module.named_buffers()))}
                  for module, kind in zip(_prefix_modules(net, len(specs)), _prefix_kinds(len(specs)))]
        self.prefixes[specs] = {"states": states, "tensors": flow.tensors, "carried": flow.carried,
                                "recalibrated": flow.recalibrated, "fits": list(fits)}


def _prefix_modules(net: ReassembledNet, length: int) -> list[torch.nn.Module]:
    """The stem, the first ``length`` blocks and the stitches between them, in the order of :func:`_prefix_kinds`."""
    return [net.stem, *net.blocks[:length], *net.stitches[: length - 1]]


def _prefix_kinds(length: int) -> list[str]:
    """Fitted modules keep their whole state; a block only its buffers (batch-norm statistics)."""
    return ["fitted", *["block"] * length, *["fitted"] * (length - 1)]


def recalibrate_batch_norms(module: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every batch-norm in ``module`` by their average over ``batches`` (each
    norm normalising by batch statistics on the way, as in training; one pass, so a generator will do); returns
    how many norms there were. The module is left in eval mode and each norm keeps its momentum."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: every batch weighs the same
        module.train()
        with torch.no_grad():
            for x in batches:
                module(x)
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    module.eval()
    return len(norms)


@torch.no_grad()
def least_squares_init(net: ReassembledNet, blocks, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                       parts=PARTS, batch_size: int = 250, ridge: float = RIDGE, recalibrate_norms: bool = True,
                       head: str = "fit", head_ridges=HEAD_RIDGES, cache: FitCache | None = None,
                       progress: bool = True) -> dict:
    """Fit the stem, stitches and (with ``labels``) head of ``net`` on ``images`` (uint8, N x C x H x W), or only
    the ``parts`` named; ``blocks`` are the :class:`~reassembly.stitch.build.SourceBlock` the network was built
    from. ``recalibrate_norms`` re-estimates every block's batch-norm statistics on the probe as the fit reaches it.
    ``head``: ``fit`` (ridge classifier, penalty and temperature chosen on held-out probe images) or ``zero``.
    ``cache`` (a :class:`FitCache` of ``images``) shares work with networks fitted before; its ``carried`` images
    come back in ``report["carried"]``, as the fitted network's pooled features before its head.
    Returns what was fitted, with each fit's relative residual on the probe."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, not {sorted(unknown)}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    if cache is not None and (cache.images is not images or set(parts) != set(PARTS)):
        raise ValueError("a FitCache serves the fit of every part on the images it was made for")
    net.eval()
    for block in blocks:
        block.model.eval()
    targets = _Targets(blocks, images, cache.targets if cache is not None else None)
    mean, std = net.structure.mean, net.structure.std
    batches = [(i, min(i + batch_size, len(images))) for i in range(0, len(images), batch_size)]
    fit_stem = "stem" in parts and isinstance(net.stem, Stem)
    stitches = {k for k, s in enumerate(net.stitches) if "stitches" in parts and s.plan.kind != "identity"}
    fit_head = "head" in parts and labels is not None
    steps = fit_stem + len(stitches) + fit_head
    bar = tqdm(total=steps * len(batches), desc="least-squares init", unit="batch", disable=not progress,
               leave=False)
    report: dict = {"probe_images": len(images), "ridge": ridge, "fits": []}

    def inputs(first: int, stop: int) -> torch.Tensor:
        return normalize(images[first:stop], mean, std)

    carried = [] if cache is None or cache.carried is None else [
        normalize(cache.carried[i:i + batch_size], mean, std) for i in range(0, len(cache.carried), batch_size)]
    flow = _Flow(net, [inputs(first, stop) for first, stop in batches], carried, recalibrate_norms)
    if recalibrate_norms or cache is not None:  # every target first, while the blocks' models are untouched:
        for k in ([0] if fit_stem else []) + [k + 1 for k in sorted(stitches)]:  # blocks cut from one model share
            for first, stop in batches:  # it, and recalibrating one changes what the model feeds the others
                targets(k, first, stop)
    specs = tuple(ref.spec for ref in net.structure.blocks)
    done = cache.restore(net, flow, specs, report["fits"]) if cache is not None else 0
    for b in range(done, len(net.blocks)):
        if b == 0 and fit_stem:
            report["fits"].append(_fit_stem(net.stem, inputs, targets, batches, ridge, bar))
        if b > 0 and b - 1 in stitches:
            report["fits"].append(_fit_stitch(b - 1, net.stitches[b - 1], flow.after(b - 1), targets, batches,
                                              ridge, bar))
        if cache is not None:
            flow.after(b)
            cache.store(net, flow, specs[: b + 1], report["fits"])
    if fit_head or recalibrate_norms or cache is not None:
        flowing = flow.after(len(net.blocks) - 1)  # recalibration reaches the last block even without a head fit
    if fit_head:
        report["fits"].append(_fit_head(net, flowing, labels, batches, head_ridges, bar, head))
    if recalibrate_norms:
        report["recalibrated_norms"] = flow.recalibrated
    if flow.carried:
        report["carried"] = torch.cat([net.head.pool(x) for x in flow.carried])
    bar.close()
    return report


def _fit_stem(stem: Stem, inputs, targets, batches, ridge, bar) -> dict:
    conv, plan = stem.conv, stem.plan
    fit, token_sum = RidgeFit(conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels), 0.0
    for first, stop in batches:
        target = targets(0, first, stop)
        if plan.target.format == "tokens" and plan.target.prefix_tokens:
            token_sum = token_sum + target[:, : plan.target.prefix_tokens].double().sum(0)
        target = _as_map(target, plan.target)
        x = _patches(inputs(first, stop), conv.kernel_size[0], conv.stride[0], conv.padding[0])
        grid = _out_grid(target, x.shape[0] // (stop - first))
        fit.add(x, _rows(target if grid is None else resize(target, grid)))
        bar.update()
    weight, intercept = fit.solve(ridge)
    conv.weight.copy_(weight.reshape(conv.weight.shape))
    # batch-norm that adds the intercept only: its statistics are those of the conv output on the probe
    mean_x, cov_x = fit.covariance()
    out_mean, out_var = weight @ mean_x, ((weight @ cov_x) * weight).sum(1).clamp_min(1e-12)
    norm = stem.norm
    norm.running_mean.copy_(out_mean)
    norm.running_var.copy_(out_var)
    norm.weight.copy_((out_var + norm.eps).sqrt())
    norm.bias.copy_(out_mean + intercept)
    if isinstance(token_sum, torch.Tensor):
        stem.class_token.copy_(token_sum[None] / batches[-1][1])
    return {"layer": "stem", "residual": round(fit.residual(weight), 4)}


def _out_grid(target: torch.Tensor, positions: int):
    """The conv output grid for ``positions`` outputs per image, when it differs from the target's."""
    side = round(positions**0.5)
    return None if (side, side) == tuple(target.shape[-2:]) else (side, side)


def _fit_stitch(k: int, stitch: Stitch, flowing: list[torch.Tensor], targets, batches, ridge, bar) -> dict:
    """Fit stitch ``k`` from ``flowing`` (the network's tensors after block ``k``) to block ``k + 1``'s input."""
    plan, proj, norm = stitch.plan, stitch.proj, stitch.norm
    conv = plan.kind == "conv"
    kernel = plan.stride
    arriving = [stitch.to_adapter(x) for x in flowing]
    if conv:  # standardise the arriving channels: BN's statistics on the probe, no affine change
        rows = torch.cat([_rows(a) for a in arriving]).double()
        norm.running_mean.copy_(rows.mean(0))
        norm.running_var.copy_(rows.var(0, unbiased=False))
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    norm.eval()
    width_in = plan.source.width * (kernel * kernel if conv else 1)
    fit, prefix_sum = RidgeFit(width_in, plan.target.width), 0.0
    for (first, stop), x in zip(batches, arriving):
        target = targets(k + 1, first, stop)
        x = norm(x)
        if conv:
            if plan.class_token:
                prefix_sum = prefix_sum + target[:, : plan.target.prefix_tokens].double().sum(0)
            target = _as_map(target, plan.target)
            rows = _patches(x, kernel, kernel, 0)
            grid = _out_grid(target, rows.shape[0] // (stop - first))
            fit.add(rows, _rows(target if grid is None else resize(target, grid)))
        else:
            if plan.class_token:
                prefix_sum = prefix_sum + target[:, : plan.target.prefix_tokens].double().sum(0)
                target = target[:, plan.target.prefix_tokens:]
            if target.shape[1] != x.shape[1]:  # another token grid: compare on the arriving one
                keep = min(plan.source.prefix_tokens, plan.target.prefix_tokens)
                side = int((x.shape[1] - keep) ** 0.5)
                target = resize(target, (side, side), tokens=True, prefix=keep)
            fit.add(_rows(x), _rows(target))
        bar.update()
    weight, intercept = fit.solve(ridge)
    proj.weight.copy_(weight.reshape(proj.weight.shape))
    proj.bias.copy_(intercept)
    if plan.class_token:
        stitch.class_token.copy_(prefix_sum[None] / batches[-1][1])
    return {"layer": f"stitch {k}", "residual": round(fit.residual(weight), 4)}


def _smoothed_losses(scales: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label-smoothed (0.1) cross-entropy of ``scale * logits`` for every scale at once."""
    log_p = torch.log_softmax(scales[:, None, None] * logits[None], dim=2)  # S x N x C
    true = log_p.gather(2, labels[None, :, None].expand(len(scales), -1, 1)).squeeze(2)
    return -(0.9 * true + 0.1 * log_p.mean(2)).mean(1)


def _fit_head(net: ReassembledNet, flowing: list[torch.Tensor], labels, batches, ridges, bar,
              head: str = "fit") -> dict:
    """A ridge classifier on the pooled features, its logits scaled by a temperature. The penalty (among ``ridges``)
    and the temperature are the pair with the lowest label-smoothed (0.1) cross-entropy on a fifth of the probe
    held out from the fit: chosen on the images it was fitted to, the head overfits them (95 % on its own 1,000
    probe images against 59 % elsewhere, weight norm 596, on the 1.5M Split-CIFAR network) and full fine-tuning
    starts from a loss of 9. The chosen penalty is then refitted on the whole probe. Ridge logits sit near 0 and 1,
    which softmax reads as near-uniform, hence the temperature; plain cross-entropy would pick an unbounded scale
    wherever the held-out images are separable.

    ``head="zero"`` fits nothing and zeroes the head (loss log C at the start, the features left untouched by the
    first gradients); the fitted head's held-out accuracy is still reported, as a measure of the features."""
    fc = net.head.fc
    pooled = torch.cat([net.head.pool(x) for x in flowing]).double()
    for _ in batches:
        bar.update()
    labels = labels[: len(pooled)].long()
    targets = F.one_hot(labels, fc.out_features).double()
    held = torch.arange(len(pooled)) % 5 == 4  # the probe is a seeded random draw: every fifth image is random too
    if held.sum() < 1 or (~held).sum() < 2:
        held = torch.zeros(len(pooled), dtype=torch.bool)
    scales = torch.logspace(0, 3, 61, dtype=torch.float64)
    check_x, check_y = (pooled[held], labels[held]) if held.any() else (pooled, labels)
    best = None
    for ridge, (weight, intercept) in zip(ridges, ridge_solutions(pooled[~held], targets[~held], ridges)):
        logits = check_x @ weight.T + intercept
        losses = _smoothed_losses(scales, logits, check_y)
        choice = int(losses.argmin())
        if best is None or float(losses[choice]) < best[0]:
            accuracy = float((logits.argmax(1) == check_y).double().mean())
            best = (float(losses[choice]), ridge, float(scales[choice]), accuracy)
    loss, ridge, scale, accuracy = best
    report = {"layer": "head", "init": head, "ridge": ridge, "temperature": round(scale, 2),
              "held_out_images": int(held.sum()), "held_out_loss": round(loss, 4),
              "held_out_top1": round(100 * accuracy, 2)}
    if head == "zero":
        fc.weight.zero_()
        fc.bias.zero_()
        return report
    (weight, intercept), = ridge_solutions(pooled, targets, [ridge])
    fc.weight.copy_(scale * weight)
    fc.bias.copy_(scale * intercept)
    centred = targets - targets.mean(0)
    error = pooled @ weight.T + intercept - targets
    report["residual"] = round(float((error**2).sum() / (centred**2).sum().clamp_min(1e-12)), 4)
    return report


def ridge_solutions(x: torch.Tensor, y: torch.Tensor, ridges) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:meth:`RidgeFit.solve` of the rows ``x`` -> ``y`` for every penalty in ``ridges`` (times the mean eigenvalue
    of the covariance of ``x``), from one thin SVD of the centred rows: cheap when there are few rows of many
    features, as a head's probe is."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    u, singular, vh = torch.linalg.svd(x - mean_x, full_matrices=False)
    projected = u.T @ (y - mean_y)
    n = len(x)
    penalty = max(float((singular**2).sum()) / (n * x.shape[1]), 1e-12)  # mean eigenvalue of the covariance
    solutions = []
    for ridge in ridges:
        weight = (vh.T @ ((singular / (singular**2 + n * ridge * penalty))[:, None] * projected)).T
        solutions.append((weight, mean_y - weight @ mean_x))
    return solutions
