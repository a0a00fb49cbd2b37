"""dspark_jax: DSpark speculative decoding in JAX (Qwen3 target, DSpark/DFlash drafters)."""

from .config import ConfigError, Qwen3Config, RopeConfig, load_qwen3_config
from .cache import KVCache
from .sampling import Sampling
from .target import Qwen3Params, ForwardOutput, forward, init_params, init_cache
from .checkpoint import CheckpointError, load_qwen3, save_qwen3, load_target
from .decoding import ar_decode, generate_ar

__version__ = "0.1.0"
