"""Training DFlare / DFlash drafts: ``dflare gen-data`` and ``dflare train`` (DESIGN.md s. 4).

data: prompts, the data folder's files and metadata; generate: regeneration with the target;
loader: data order and batches; blocks: anchors, block inputs, the block attention mask;
losses: the alignment losses; objective: one training forward; checkpoint: save / resume;
distributed: torchrun process group and FSDP2; trainer: the loop; cli: the two verbs.
"""
