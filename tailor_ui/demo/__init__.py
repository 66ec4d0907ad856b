"""The built-in demo: the shapes world and its tiny LLaVA pair (see `build.build_demo`).

world      seeded scenes, images and ground truth for captioning, VQA and counting
processor  the offline word-level LlavaProcessor
model      the miniature LLaVA architecture
train      vision pre-training and the AdamW loop for base training and fine-tuning
build      regenerates assets/demo: data sets, base/ and finetuned/ checkpoints, scores
"""
