"""The ``cross-attention`` matcher: Hedlin et al.'s optimised-context matching.

For each source point, ``restarts`` contexts (``context_length`` x the UNet's
cross-attention width, initialised N(0, 1), the text encoder bypassed) are
optimised with Adam so that the chosen token's cross-attention at the chosen
layers matches a Gaussian at the point, one random crop per step. The target is
then run with each context on ``crops`` crops (four corners, then crops around
the running argmax), the maps pasted into a canvas; per layer the contexts' maps
are averaged and softmaxed over pixels, the layers averaged and the argmax is
the match. Every random draw comes from a per-(point, restart) seeded generator,
so batching several optimisations in one UNet call (``max_batch``) changes
nothing.

Speed-ups that change results are options, off by default: ``dtype`` runs the
UNet and VAE in float16 or bfloat16 (the contexts, Adam, the attention
probabilities and the loss stay float32), and ``crop_bank = N`` encodes N random
crops per source point once and draws each step's crop from them instead of
encoding a new one every step (each step's crop still follows the official
rule's distribution; crops repeat across steps and restarts).

With a feature store the optimised contexts of each source point are kept there
(:class:`~diffeat.core.query_cache.QueryCache`, float32, with their loss
curves) as soon as the point's restarts are done: a second target, a rerun or
an evaluation where the image recurs optimises nothing twice, with the same
result bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from diffeat.core.components import Matcher, MatchResult, View
from diffeat.core.devices import pick_device
from diffeat.core.errors import ConfigError, DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.geometry import ImageTransform, check_points
from diffeat.core.progress import progress_bar
from diffeat.plugins.cross_attention.attention import (
    CrossAttentionLayer,
    TokenAttention,
    resolve_layers,
    select_heads,
)
from diffeat.plugins.cross_attention.crops import (
    argmax_point,
    crop_resized,
    crop_side,
    draw_crop,
    gaussian_target,
    squashed,
    stream_seed,
)
from diffeat.plugins.cross_attention.model import (
    DTYPES,
    DiffusionParts,
    load_diffusion_parts,
    model_folder,
)
from diffeat.plugins.cross_attention.options import CrossAttentionOptions

Point = tuple[float, float]
T = TypeVar("T")


@dataclass
class Job:
    """One independent optimisation (or inference): a point, a restart, its own generator."""

    point: Point
    restart: int
    generator: torch.Generator
    context: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)


@dataclass
class CropBank:
    """One source point's pre-encoded crops: ``starts[i]`` is drawn by the official rule and
    ``latents[starts[i]]`` is its latent (a position drawn twice is encoded once)."""

    starts: list[tuple[int, int]]
    latents: dict[tuple[int, int], torch.Tensor]


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def _half_on_cpu(dtype: str, device: torch.device) -> Iterator[None]:
    """A torch without a float16 CPU kernel for an op: a clear error, not a traceback."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        if dtype == "float16" and device.type == "cpu" and "Half" in str(exc):
            raise DiffeatError(
                f"matcher.dtype = 'float16': this torch has no float16 CPU kernel for an op "
                f"the UNet or VAE runs ({str(exc).splitlines()[0]}); use dtype = 'bfloat16' "
                "or 'float32' on the CPU, or a CUDA device"
            ) from None
        raise


class CrossAttentionMatcher(Matcher):
    """Matches by optimising a context per source point (Hedlin et al., NeurIPS 2023)."""

    Options = CrossAttentionOptions
    needs_descriptors = False

    def __init__(self, options: CrossAttentionOptions | None = None) -> None:
        self.options = options or CrossAttentionOptions()
        self.device = pick_device(self.options.device)
        self._parts: DiffusionParts | None = None
        self._layers: list[CrossAttentionLayer] | None = None
        self._cache: Any = None  # a QueryCache when the pipeline has a store
        self._bar: Any = None  # the progress bar of the running match (counts UNet calls)
        self._banks: dict[Point, CropBank] = {}  # crop_bank > 0: the banks of ``optimise``

    def use_cache(self, cache: Any) -> None:
        """Keep each source point's optimised contexts in ``cache`` (a ``QueryCache``)."""
        self._cache = cache

    # -- the model, loaded on first use ----------------------------------------------------

    @property
    def parts(self) -> DiffusionParts:
        """The frozen UNet, VAE encoder and noise schedule, loaded on first use."""
        if self._parts is None:
            folder = model_folder(self.options.model, self.options.revision)
            dtype = DTYPES[self.options.dtype]
            self._parts = load_diffusion_parts(folder, dtype, self.device)
        return self._parts

    @property
    def layers(self) -> list[CrossAttentionLayer]:
        """The cross-attention modules read (a :class:`ConfigError` names a bad layer)."""
        if self._layers is None:
            self._layers = resolve_layers(self.parts.unet, self.options.layers)
        return self._layers

    def model_identity(self) -> dict[str, str]:
        """A content fingerprint of the loaded UNet, VAE and scheduler files."""
        return self.parts.identity()

    # -- the steps shared by both phases ----------------------------------------------------

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> float32 latents: the posterior mean x the scaling
        factor (the VAE runs in its own dtype)."""
        vae = self.parts.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean.float() * self.parts.scaling_factor

    def _noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        acp = self.parts.alphas_cumprod.to(latents.device)[t]
        return acp**0.5 * latents + (1 - acp) ** 0.5 * noise.to(latents.device)

    def _draw_noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        if self.options.noise == "uniform":
            return torch.rand(shape, generator=generator)
        return torch.randn(shape, generator=generator)

    def _maps(
        self, latents: torch.Tensor, t: int, context: torch.Tensor, side: int
    ) -> torch.Tensor:
        """``[B, L, side, side]``: each layer's token map, heads averaged, upsampled.

        The latents and the (float32) context are cast to the UNet's dtype here, so the
        gradient reaches the float32 context through a half-precision UNet; the maps are
        float32 (the probabilities are recomputed in float32)."""
        unet = self.parts.unet
        probe = TokenAttention(unet, self.layers, self.options.token)
        timestep = torch.tensor(t, device=latents.device)
        calls = probe(latents.to(unet.dtype), timestep, context.to(unet.dtype))
        if self._bar is not None:
            self._bar.update(1)
        maps = [
            F.interpolate(
                select_heads(m, self.options.heads)[:, None],
                size=(side, side),
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            for m in calls
        ]
        return torch.stack(maps, dim=1)

    @property
    def _latent_channels(self) -> int:
        return int(self.parts.unet.config.in_channels)

    def _check_timesteps(self) -> None:
        n = len(self.parts.alphas_cumprod)
        for name in ("optimise_timestep", "inference_timestep"):
            value = getattr(self.options, name)
            if value >= n:
                raise ConfigError(
                    f"matcher.{name} = {value} is beyond the model's {n} training timesteps"
                )

    # -- phase 1: contexts ------------------------------------------------------------------

    def optimise(
        self,
        image: torch.Tensor,
        jobs: list[Job],
        done: Callable[[list[Job]], None] | None = None,
    ) -> None:
        """Optimise each job's context on the squashed source ``image`` ``[3, S, S]``;
        ``done`` gets the jobs of each chunk once it is optimised. With ``crop_bank`` a
        point's bank is built when its first job runs and dropped after its last."""
        left: dict[Point, int] = {}
        for job in jobs:
            left[job.point] = left.get(job.point, 0) + 1
        try:
            for chunk in _chunks(jobs, self.options.max_batch):
                self._optimise_chunk(image, chunk)
                for job in chunk:
                    left[job.point] -= 1
                    if not left[job.point]:
                        self._banks.pop(job.point, None)
                if done is not None:
                    done(chunk)
        finally:
            self._banks = {}

    def crop_bank_of(self, image: torch.Tensor, point: Point) -> CropBank:
        """The bank of ``point`` on the squashed source ``image``: ``crop_bank`` crop starts
        drawn by the official rule from a generator of (``seed``, point) (shared by the
        point's restarts), each distinct start encoded once, ``max_batch`` crops a VAE call."""
        bank = self._banks.get(point)
        if bank is not None:
            return bank
        o = self.options
        size = image.shape[-1]
        crop = crop_side(size, o.crop_percent)
        g = torch.Generator().manual_seed(stream_seed(o.seed, "crop-bank", point, 0))
        starts = [draw_crop(point, size, crop, o.margin, g) for _ in range(o.crop_bank)]
        latents: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad():
            for part in _chunks(list(dict.fromkeys(starts)), o.max_batch):
                self._crop_latents(image, part, crop, latents)
        bank = self._banks[point] = CropBank(starts, latents)
        return bank

    def _optimise_chunk(self, image: torch.Tensor, jobs: list[Job]) -> None:
        o = self.options
        size = image.shape[-1]
        crop = crop_side(size, o.crop_percent)
        width = int(self.parts.unet.config.cross_attention_dim)
        context = torch.stack(
            [torch.randn((o.context_length, width), generator=j.generator) for j in jobs]
        ).to(self.device)
        context.requires_grad_(True)
        optimiser = torch.optim.Adam([context], lr=o.lr)
        latent_side = size // 8
        for _ in range(o.steps):
            with torch.no_grad():
                crops, banked, targets, noises = [], [], [], []
                for job in jobs:
                    if o.crop_bank:
                        bank = self.crop_bank_of(image, job.point)
                        pick = torch.randint(0, len(bank.starts), (1,), generator=job.generator)
                        x0, y0 = bank.starts[int(pick.item())]
                        banked.append(bank.latents[(x0, y0)])
                    else:
                        x0, y0 = draw_crop(job.point, size, crop, o.margin, job.generator)
                        crops.append(crop_resized(image, x0, y0, crop))
                    targets.append(gaussian_target(job.point, x0, y0, crop, size, o.sigma))
                    shape = torch.Size((1, self._latent_channels, latent_side, latent_side))
                    noises.append(self._draw_noise(shape, job.generator))
                latents = torch.stack(banked) if banked else self._encode(torch.stack(crops))
                noisy = self._noisy(latents, torch.cat(noises), o.optimise_timestep)
                target = torch.stack(targets).to(self.device)
            maps = self._maps(noisy, o.optimise_timestep, context, size)
            per_job = ((maps - target[:, None]) ** 2).mean(dim=(1, 2, 3))
            per_job.sum().backward()
            optimiser.step()
            optimiser.zero_grad()
            for job, loss in zip(jobs, per_job.tolist()):
                job.losses.append(loss)
        for job, ctx in zip(jobs, context.detach()):
            job.context = ctx[None]

    # -- phase 2: attention on the target ---------------------------------------------------

    @torch.no_grad()
    def attend(self, image: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """``[len(jobs), L, S, S]``: each job's context's canvas of maps on ``image``.

        A crop's latent depends only on its position, so each position is encoded
        once for all jobs (the four corner crops are shared by every point and restart).
        """
        latents: dict[tuple[int, int], torch.Tensor] = {}
        out = [
            self._attend_chunk(image, chunk, latents)
            for chunk in _chunks(jobs, self.options.max_batch)
        ]
        return torch.cat(out)

    def _crop_latents(
        self,
        image: torch.Tensor,
        starts: list[tuple[int, int]],
        crop: int,
        cache: dict[tuple[int, int], torch.Tensor],
    ) -> torch.Tensor:
        """``[len(starts), 4, h, w]``: the crops' latents, encoding each new position once."""
        missing = list(dict.fromkeys(s for s in starts if s not in cache))
        if missing:
            crops = torch.stack([crop_resized(image, x0, y0, crop) for x0, y0 in missing])
            cache.update(zip(missing, self._encode(crops)))
        return torch.stack([cache[s] for s in starts])

    def _attend_chunk(
        self, image: torch.Tensor, jobs: list[Job], cache: dict[tuple[int, int], torch.Tensor]
    ) -> torch.Tensor:
        o = self.options
        size = image.shape[-1]
        crop = crop_side(size, o.crop_percent)
        latent_side = size // 8
        n_layers = len(self.layers)
        total = torch.zeros((len(jobs), n_layers, size, size), device=self.device)
        count = torch.zeros((len(jobs), 1, size, size), device=self.device)
        corners = [(0.0, 0.0), (0.0, float(size)), (float(size), 0.0), (float(size), float(size))]
        context = torch.cat([j.context for j in jobs if j.context is not None]).to(self.device)
        for i in range(o.crops):
            noises, starts = [], []
            for b, job in enumerate(jobs):
                if i < 4:
                    loc = corners[i]
                else:
                    running = torch.nan_to_num(total[b] / count[b], nan=0.0).mean(dim=0)
                    x, y = argmax_point(running)
                    loc = (x + 0.5, y + 0.5)
                x0, y0 = draw_crop(loc, size, crop, o.margin, job.generator)
                starts.append((x0, y0))
                shape = torch.Size((1, self._latent_channels, latent_side, latent_side))
                noises.append(self._draw_noise(shape, job.generator))
            latents = self._crop_latents(image, starts, crop, cache)
            noisy = self._noisy(latents, torch.cat(noises), o.inference_timestep)
            maps = self._maps(noisy, o.inference_timestep, context, crop)
            for b, (x0, y0) in enumerate(starts):
                total[b, :, y0 : y0 + crop, x0 : x0 + crop] += maps[b]
                count[b, :, y0 : y0 + crop, x0 : x0 + crop] += 1
        return total / count

    # -- contexts kept in the store ---------------------------------------------------------

    @staticmethod
    def _query(point: Point) -> str:
        """The cache query of a point: its exact coordinates in the size frame."""
        return f"point {point[0]!r},{point[1]!r}"

    def _reuse(self, source: View, jobs: list[Job]) -> list[Job]:
        """Fill the jobs whose point's contexts the cache holds; the others are returned."""
        cache, restarts = self._cache, self.options.restarts
        if cache is None:
            return list(jobs)
        todo: list[Job] = []
        for start in range(0, len(jobs), restarts):
            point_jobs = jobs[start : start + restarts]
            stored = cache.get(source.image, self._query(point_jobs[0].point))
            if stored is None:
                todo += point_jobs
                continue
            contexts = stored.layers["contexts"][0]  # [R, length, width]
            losses = stored.layers["losses"][0, :, :, 0] if "losses" in stored.layers else None
            for r, job in enumerate(point_jobs):
                job.context = contexts[r : r + 1].to(self.device)
                job.losses = losses[r].tolist() if losses is not None else []
        return todo

    def _optimise_and_keep(self, source: View, image: torch.Tensor, todo: list[Job]) -> None:
        """Optimise ``todo`` (whole points, restart-major); keep each point once done."""
        cache, restarts = self._cache, self.options.restarts
        if cache is None:
            self.optimise(image, todo)
            return

        def keep(chunk: list[Job]) -> None:
            for job in chunk:
                if job.restart != restarts - 1:
                    continue  # a point is complete when its last restart is
                index = next(i for i, j in enumerate(todo) if j is job)
                point_jobs = todo[index - restarts + 1 : index + 1]
                assert all(j.context is not None for j in point_jobs)
                contexts = torch.cat([j.context for j in point_jobs if j.context is not None])
                size = image.shape[-1]
                layers = {"contexts": contexts[None].detach().float().cpu()}
                if self.options.steps:  # [1, R, steps, 1]: NaN or inf losses kept as they are
                    curves = torch.tensor([j.losses for j in point_jobs], dtype=torch.float32)
                    layers["losses"] = curves[None, :, :, None]
                result = FeatureSet(
                    layers,
                    (self.options.optimise_timestep,),
                    {
                        "transform": ImageTransform.resize((size, size), (size, size)).to_dict(),
                        "point": list(job.point),
                    },
                )
                cache.put(source.image, self._query(job.point), result, source=source.source)

        if todo:
            self.optimise(image, todo, keep)

    def unet_calls(self, optimised: int, inferred: int) -> int:
        """The UNet calls of optimising ``optimised`` jobs and running ``inferred`` jobs on a
        target: every chunk of ``max_batch`` jobs takes ``steps`` (or ``crops``) calls."""
        o = self.options
        return -(-optimised // o.max_batch) * o.steps + -(-inferred // o.max_batch) * o.crops

    # -- the matcher ------------------------------------------------------------------------

    def jobs(self, points: list[Point], kind: str) -> list[Job]:
        """One job per (point, restart), point-major, each with its own seeded generator."""
        out = []
        for p in points:
            for r in range(self.options.restarts):
                g = torch.Generator().manual_seed(stream_seed(self.options.seed, kind, p, r))
                out.append(Job(p, r, g))
        return out

    def match(self, source: View, target: View, points: torch.Tensor) -> MatchResult:
        """Target points for source ``points`` ``[N, 2]``; ``extras["losses"]`` holds every
        optimisation step's loss ``[N, restarts, steps]``, ``extras["layer_peaks"]`` each
        layer's peak softmax probability ``[N, L]`` (printed by ``--json``), and
        ``extras["attention"]`` the per-layer softmax maps ``[N, L, size, size]`` with
        ``return_maps``."""
        o = self.options
        pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        if len(pts) == 0:
            raise ValueError(
                "the cross-attention matcher got no source points; give at least one (x, y) "
                "point (--point X,Y)"
            )
        check_points(pts, source.image_size, "source point")
        self._check_timesteps()
        size = o.size
        sw, sh = source.image_size
        scale = torch.tensor([size / sw, size / sh], dtype=torch.float32)
        frame = (pts * scale).tolist()
        src = squashed(source.image, size)
        tgt = squashed(target.image, size)
        optimised = self.jobs([(float(x), float(y)) for x, y in frame], "optimise")
        inference = self.jobs([(float(x), float(y)) for x, y in frame], "infer")
        desc = f"cross-attention, {len(pts)} point{'s' if len(pts) != 1 else ''}"
        todo = self._reuse(source, optimised)
        total = self.unet_calls(len(todo), len(inference))
        with (
            _half_on_cpu(o.dtype, self.device),
            progress_bar(total, desc, "UNet call", o.progress) as bar,
        ):
            self._bar = bar
            try:
                self._optimise_and_keep(source, src, todo)
                for job, done in zip(inference, optimised):
                    job.context = done.context
                canvases = self.attend(tgt, inference)  # [N * R, L, S, S]
                bar.refresh()  # the final count, whatever the redraw interval skipped
            finally:
                self._bar = None
        found, scores, kept, peaks = [], [], [], []
        for n in range(len(pts)):
            maps = canvases[n * o.restarts : (n + 1) * o.restarts].mean(dim=0)  # [L, S, S]
            probs = torch.softmax(maps.reshape(maps.shape[0], -1), dim=-1).reshape(maps.shape)
            peaks.append(probs.reshape(probs.shape[0], -1).amax(dim=1).cpu())
            if o.return_maps:
                kept.append(probs.cpu())
            mean = probs.mean(dim=0)
            x, y = argmax_point(mean)
            found.append((x + o.offset, y + o.offset))
            scores.append(float(mean.max()))
        tw, th = target.image_size
        back = torch.tensor([tw / size, th / size], dtype=torch.float32)
        points_out = torch.tensor(found, dtype=torch.float32) * back
        losses = torch.tensor([j.losses for j in optimised]).reshape(len(pts), o.restarts, o.steps)
        extras: dict[str, torch.Tensor] = {"losses": losses, "layer_peaks": torch.stack(peaks)}
        if o.return_maps:
            extras["attention"] = torch.stack(kept)
        return MatchResult(
            points_out,
            torch.tensor(scores, dtype=torch.float32),
            torch.ones(len(pts), dtype=torch.bool),
            extras,
            json_extras={"layer_peaks": list(o.layers)},
        )
