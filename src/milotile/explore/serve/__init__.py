"""The atlas selection web app (``milotile explore serve``): one port, stdlib server, WebGL2 page."""

from milotile.explore.serve.app import AtlasApp, make_server, patch_png, serve

__all__ = ["AtlasApp", "make_server", "patch_png", "serve"]
