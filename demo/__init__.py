"""Built-in demo: a procedural shapes VQA task and tiny LLaVA teacher/student checkpoints."""
