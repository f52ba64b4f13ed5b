"""tokserve training: data readers, losses, training loops, evaluation metrics and the command line.

    python -m training tokenizer --config tokenizer-default
    python -m training generator --config generator-default
    python -m training eval-tokenizer --model weights/default/tokenizer
    python -m training eval-generator --model weights/default/generator
    python -m training compute-latent-stats --tokenizer runs/tokenizer-default/export

See training/README.md. Imports point one way: training -> models.
"""
