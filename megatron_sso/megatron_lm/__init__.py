"""``torchrun ... -m megatron_sso.megatron_lm [Megatron-LM args] --optimizer sso``.

The command's name only: the launcher lives in :mod:`megatron_sso.mcore.megatron_lm` (the one
package that imports Megatron), which runs Megatron-LM's ``pretrain_gpt.py`` (a checkout) or our
built-in GPT script (megatron-core 0.19's ``megatron.training``) with our optimizers and flags. See docs/megatron.md, "Megatron-LM users".
"""

from ..mcore.megatron_lm import ENV_VAR, SCRIPT, LaunchError, find_script, main

__all__ = ["ENV_VAR", "SCRIPT", "LaunchError", "find_script", "main"]
