"""XQ-GAN training: the menu of discriminators, GAN and contrastive-alignment losses, fine-tuning modes
(full, LoRA, frozen), the TOML config format that names each choice, and the loop that runs it.

Import the parts from their modules (``training.xqgan.config``, ``.losses``, ``.discriminators``,
``.finetune``, ``.objective``, ``.train``); this package module imports nothing heavy.
"""
