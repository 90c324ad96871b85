"""The penwatch Streamlit dashboard: app, data sources, chart builders."""
