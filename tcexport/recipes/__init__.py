"""YAML recipes: export -> compress -> validate -> build -> bench in one run.

    fields   the checks one field's value goes through, and the annotated field types
    schema   the pydantic sections (model, export, compress, validate, build, bench) and the Recipe
    loading  reading a recipe file or plain data: load, parse, one-line errors naming the field
    runner   running a recipe stage by stage into an output directory (run, check_output, build_from_file)
    summary  summary.json and what a run prints at the end
"""
