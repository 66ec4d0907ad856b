"""The dashboard's application: nothing in the library or the command line imports it.

ui/        Gradio Blocks, one module per tab, wiring widgets to the services
service/   what a visitor can do, with progress (no Gradio)
jobs, gpu  background jobs, one lane per device; where GPU work runs
session    per-visitor state and the pairs visitors work on
plots      plotly figures from the library's tables and reports
"""
