"""The application's services, shared by the dashboard and the command line (no Gradio).

config     StudioConfig (what a deployment may change), env_config, the dashboard's defaults
pairs      loading a visitor's pair (with progress) and the built-in demo pair
tailor     a merge with its quick check, filed under the session
compare    answers of every model of a session to one question
sweep      the forgetting table of a session's pair, with its fine-tuned models
finetune   fine-tuning a private copy of the demo's base, optionally tailored after
export     the tailored model as a folder or a zip
studio     `Studio`: the facade that owns the job runner, the demo pair and the sessions
"""
