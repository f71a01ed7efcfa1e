"""awsfun deploy, one module per concern; ./deploy.sh runs deploy.py, which runs cli.main."""
