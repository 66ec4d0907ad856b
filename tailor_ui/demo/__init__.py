"""The built-in demo: the shapes world and its tiny LLaVA pair (see `build.build_demo`).

world      seeded scenes, images and ground truth for captioning, VQA, counting, spatial
           questions
processor  the offline word-level LlavaProcessor
model      the miniature LLaVA architecture
train      vision pre-training (the language model trains on the training package's loop)
build      regenerates assets/demo: data sets, the base and two fine-tunes of it (the
           spatial story at the top, counting/), scores
"""
