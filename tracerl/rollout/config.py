"""RolloutConfig: how the sampler denoises (names follow LLaDA / Fast-dLLM / TRL where they exist)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tracerl.choices import AfterEos, CacheMode, DriftAxis, Remasking, options
from tracerl.errors import UserError

REMASKING = options(Remasking)
CACHES = options(CacheMode)
AFTER_EOS = options(AfterEos)
CACHEABLE_FAMILIES = ("llada", "Dream", "tracerl_tiny")  # native transformers Llama / Qwen2 backbones
CONFIDENCE_POLICIES = REMASKING[:4]  # ("low_confidence", "top_margin", "entropy", "random")
SEDD_SAMPLERS = ("sedd_euler", "sedd_analytic")  # read a SEDD model's score mass
PUBLISHED_SAMPLERS = ("mdlm_ancestral", "dream_origin", *SEDD_SAMPLERS)  # tracerl/rollout/published.py
_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, prompt index, ...), mixed by splitmix64 so nearby inputs give
    unrelated generator streams. Rollouts seed each row from what identifies it, never from its batch slot."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@dataclass
class RolloutConfig:
    max_completion_length: int = 64  # L: response tokens generated per prompt
    steps: int = 64  # denoising steps over the whole response (static schedule)
    block_length: int | None = None  # semi-AR block length; None = the model's block_size (block diffusion) or L
    remasking: Remasking = "low_confidence"  # which masked positions to commit first: low_confidence | top_margin |
    #   entropy | random; or a published sampler that unmasks each position at random on its own time grid, steps /
    #   num_blocks grid steps per block (+ one final forward for what is left): mdlm_ancestral (any family),
    #   dream_origin (Dream's `origin` alg, any family; its last step commits the rest), sedd_euler | sedd_analytic
    #   (SEDD models: the probability reads the score mass)
    threshold: float | None = None  # dynamic policy (Fast-dLLM): commit every position whose confidence exceeds it
    #   (at least one per step); the static `steps` schedule is then ignored
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens holding this much probability
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    use_kv_cache: bool = True  # block diffusion: serve committed blocks from the KV cache (exact)
    cache: CacheMode = "none"  # full attention (LLaDA, Dream): none (exact) | Fast-dLLM's approximate cache per
    #   semi-AR block, prefix (reuse the prefix's keys) | dual (prefix and suffix) (tracerl/rollout/caching.py) |
    #   elastic: Elastic-Cache, a sliding window of masks and attention-drift-triggered refresh (rollout/elastic.py)
    cache_horizon: int | None = None  # positions past the block recomputed at every cached step. prefix: the
    #   ones beyond are dropped from attention until the next block (dLLM-RL's further horizon); None = all of them.
    #   dual: the ones beyond are served stale from the cache; None = 0 (Fast-dLLM's dual cache)
    cache_refresh: int | None = None  # run the exact full forward again every this many steps inside a block
    #   (None: only at the block's first step, as Fast-dLLM does)
    cache_window: int | None = None  # elastic: the still-masked positions recomputed at every step, from the
    #   block's start (>= block_length; None = block_length; the authors use 16 for LLaDA, 32 for Dream)
    cache_gamma: float | None = None  # elastic: the attention-drift trigger; a layer whose tracked tokens' attention
    #   keeps a cosine similarity below it makes every later layer recompute every position (None = 0.9, published)
    cache_drift: DriftAxis | None = None  # elastic: heads (the authors' code: cosine across heads at each key) | keys (each
    #   head's attention distribution over the keys); None = heads
    after_eos: AfterEos = "fill"  # the masked positions after a committed EOS. fill: EOS padding at once, no
    #   forward spent on them (ours; the README's results). finish_block: the EOS's block is denoised by the model,
    #   later blocks become padding (SDAR generate.py, JetEngine). denoise: every position is denoised by the model
    #   (LLaDA, Dream, Fast-dLLM); what follows the first EOS is then sampled and trained like any other token
    seed: int | None = None  # None = the global torch RNG; else row n samples from its own generator (row seeds)

    def validate(self) -> None:
        L = self.max_completion_length
        if L < 1:
            raise UserError(f"max_completion_length must be >= 1, got {L}")
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.remasking not in REMASKING:
            raise UserError(f"remasking={self.remasking!r} is not one of {', '.join(REMASKING)}")
        if self.threshold is not None and self.remasking in PUBLISHED_SAMPLERS:
            raise UserError(
                f"remasking: {self.remasking!r} is a published sampler whose time grid decides which positions "
                f"unmask; rollout.threshold={self.threshold} does not apply with rollout.remasking={self.remasking} "
                "(set threshold: null, or use remasking low_confidence / top_margin)"
            )
        if self.threshold is not None:
            if not 0.0 < self.threshold <= 1.0:
                raise UserError(f"threshold must lie in (0, 1], got {self.threshold}")
            if self.remasking not in ("low_confidence", "top_margin"):
                raise UserError(
                    f"threshold needs a probability-like confidence (remasking low_confidence or top_margin), "
                    f"got remasking={self.remasking!r}"
                )
        if self.block_length is not None and self.block_length < 1:
            raise UserError(f"block_length must be >= 1 (or null for the model's own), got {self.block_length}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # `not >=` also refuses NaN
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.after_eos not in AFTER_EOS:
            raise UserError(f"after_eos={self.after_eos!r} is not one of {', '.join(AFTER_EOS)}")
        if self.cache not in CACHES:  # a typo must not silently run some approximate cache
            raise UserError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        for name in ("cache_horizon", "cache_refresh", "cache_window"):  # counts of positions / steps
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        if self.cache != "none" and self.remasking in PUBLISHED_SAMPLERS:
            raise UserError(f"cache={self.cache} is not implemented with rollout.remasking={self.remasking} "
                            "(rollout.cache and rollout.remasking: the published samplers run uncached)")
        if self.cache_window is not None and (self.cache != "elastic" or self.cache_window < 1):
            raise UserError(f"cache_window={self.cache_window} needs rollout.cache elastic and a value >= 1")
        if self.cache_gamma is not None and (self.cache != "elastic" or not 0.0 <= self.cache_gamma <= 2.0):
            raise UserError(f"cache_gamma={self.cache_gamma} needs rollout.cache elastic and a value in [0, 2] "
                            "(a cosine similarity threshold; above 1 every cached step refreshes from layer 1)")
        if self.cache_drift is not None and (self.cache != "elastic" or self.cache_drift not in ("heads", "keys")):
            raise UserError(f"cache_drift={self.cache_drift!r} needs rollout.cache elastic and one of heads, keys")
        if self.cache_horizon is not None and (self.cache not in ("prefix", "dual") or self.cache_horizon < 0):
            raise UserError(f"cache_horizon={self.cache_horizon} needs rollout.cache prefix or dual and a "
                            "value >= 0")
        if self.cache_refresh is not None and (self.cache not in ("prefix", "dual") or self.cache_refresh < 1):
            raise UserError(f"cache_refresh={self.cache_refresh} needs rollout.cache prefix or dual and a "
                            "value >= 1")

    def check_family(self, family: str, block_size: int | None = None) -> None:
        """Refuse a sampler on a model it does not belong to. MDLM's ancestral rule is model-free, so it runs on
        every masked-diffusion family; SEDD's rules read the score mass of a SEDD model's log-score. The approximate
        caches need a full-attention transformers backbone: block diffusion has its own exact cache, and the DiT
        (MDLM, SEDD) and remote-code models take no cache."""
        if self.cache != "none":
            if block_size is not None:
                raise UserError(f"rollout.cache={self.cache} is for full-attention models; this one ({family!r}) is "
                                "block diffusion, whose KV cache is exact: use rollout.use_kv_cache (and rollout.cache: "
                                "none)")
            if family not in CACHEABLE_FAMILIES:
                raise UserError(f"rollout.cache={self.cache} needs a transformers backbone that takes a KV cache "
                                f"({', '.join(CACHEABLE_FAMILIES)}); model family {family!r} cannot (rollout.cache: none)")
        if self.remasking in SEDD_SAMPLERS and family != "sedd":
            raise UserError(
                f"rollout.remasking={self.remasking} is SEDD's sampler: its unmask probability is read from a SEDD "
                f"model's score (model family 'sedd'), and this model's family is {family!r}; use "
                "rollout.remasking=mdlm_ancestral (model-free, any family) or a confidence policy"
            )

    def resolve_block_length(self, model_block_size: int | None) -> int:
        """The block length the sampler walks: the model's attention block for block diffusion."""
        L = self.max_completion_length
        if model_block_size is not None:
            if self.block_length not in (None, model_block_size):
                raise UserError(
                    f"block_length={self.block_length} differs from the model's block_size={model_block_size}; "
                    "a block-diffusion model must be sampled in its own blocks (set block_length: null)"
                )
            block = model_block_size
        else:
            block = self.block_length or L
        if L % block:
            raise UserError(f"max_completion_length={L} is not a multiple of block_length={block}")
        if self.cache == "elastic" and self.cache_window is not None and self.cache_window < block:
            raise UserError(f"cache_window={self.cache_window} is shorter than the block the sampler commits in "
                            f"(block_length={block}): every position it may commit needs fresh logits; set "
                            f"rollout.cache_window >= {block} or a shorter rollout.block_length")
        num_blocks = L // block
        if self.threshold is None and self.steps % num_blocks:
            raise UserError(
                f"steps={self.steps} cannot be divided over {num_blocks} blocks "
                f"(max_completion_length={L} / block_length={block}); use a multiple of {num_blocks}"
            )
        return block
