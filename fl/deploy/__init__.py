"""The Deployment Engine around OncoFed: SuperLink and SuperNode processes, certificates, the
Fleet-only gateway, and the localhost demo."""
