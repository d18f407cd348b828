"""The integrations: transformers (quantizer, Trainer, patches), checkpoint files, saving, model card, Core ML.

quantizer.py             DKMHfQuantizer (transformers' from_pretrained / save_pretrained hooks); prepare, dequantize
transformers_patches.py  everything dkm_hf changes in transformers beyond its public hooks, each with its reason
trainer.py, callback.py  DKMTrainer, DKMTrainingArguments; DKMCallback (milestone, tau schedule, cluster health)
distillation.py          the teacher's KL / hidden-state terms of DKMTrainer(teacher_model=...)
distributed.py           FSDP2: gathering the whole weights (or state dict) for palettizing and saving
safetensors_files.py     safetensors headers read and checked without reading data; a checkpoint's files
checkpoint_checks.py     what a training / palettized checkpoint must hold, before and after loading; checksums
summary.py               bytes of a palettized checkpoint per layer and in total
saving.py                atomic saves
model_card.py            the model card of a palettized checkpoint
coreml.py                Core ML export: palettized weights as constexpr_lut_to_dense ops (dkm_hf.export)
"""
