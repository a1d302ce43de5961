"""Generators of the data molf_ds ships and its demos use (run as `python -m molf_ds.commands.datagen.NAME`):
`sql_templates` (the sql task's rows), `known_facts` (counterfactual rewrites of facts a model knows), `demo` (the
tiny demo's model, tokenizer and facts). The training job reads their output like any user's data."""
