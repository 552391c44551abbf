"""The SHAP explainability reporter behind the ``shap_report`` tool, in stages.

``data`` reads and cleans the table, ``model`` trains or safely loads a model, ``explain`` computes
SHAP values and the ranking, ``plots`` draws the figures and ``report`` writes the narrative, the
Markdown/HTML files and the chat answer; ``pipeline`` runs them in order. Heavy libraries (shap,
xgboost, pandas, matplotlib) are imported inside the stages, never when the registry starts.
"""
