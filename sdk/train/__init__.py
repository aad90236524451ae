"""Training: causal-LM pre-training and continued pre-training of the native model, from one
process to a cluster (torchrun, the deepspeed launcher, Slurm).

The parts, each one file a person reads on its own:
- shards.py    the token shards `hanlin data prepare` writes and training reads (memmap, sha256)
"""
