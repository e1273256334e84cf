"""TraceRL: reinforcement learning for diffusion language models along their denoising trajectories.

    from tracerl import TraceRLConfig, TraceRLTrainer      # the TRL-shaped Python API (tracerl/api.py)
"""

from tracerl.api import TraceRLConfig, TraceRLTrainer

__all__ = ["TraceRLConfig", "TraceRLTrainer"]
