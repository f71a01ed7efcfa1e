"""The routing table (routes.json) as deploy reads and checks it."""

from __future__ import annotations

import json
from pathlib import Path

import lambda_function

from .core import DeployError
from .artifacts import ROUTES_FILE


def load_routes_file(path=ROUTES_FILE):
    """Return the routes of a routing table file, validated as the handler would; DeployError names the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DeployError(f"cannot read the routing table {path}: {err.strerror}") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise DeployError(f"routing table {path} is not valid JSON: {err}") from None
    try:
        return lambda_function.validate_routes(table)
    except lambda_function.RoutesError as err:
        raise DeployError(f"routing table {path}: {err}") from None


def template_instance_types(routes, default_template, default_type):
    """Return {launch template: instance type}: the worker template, then each one the routes name (pure).

    A route without instance_type takes the default; two routes that give one template
    different types, or a route that gives the worker template another type than
    --instance-type, are refused, since one template has one instance type.
    """
    chosen = {default_template: (default_type, "--instance-type")}
    for route in routes:
        wanted = route.get("instance_type")
        if wanted is None:
            continue
        name = route["launch_template"]
        have, source = chosen.setdefault(name, (wanted, f"route {route['name']!r}"))
        if have != wanted:
            raise DeployError(
                f"route {route['name']!r} wants launch template {name} as {wanted}, but "
                f"{source} makes it {have}; give the route its own launch_template")
    types = {name: chosen[name][0] for name in chosen}
    for route in routes:
        types.setdefault(route["launch_template"], default_type)
    return types


def template_volume_sizes(routes):
    """Return {launch template: root volume GiB} for the templates whose routes set
    root_volume_gib (pure); DeployError if two routes give one template different sizes.

    A route's input copy and outputs live on the instance's disk (AL2023's /tmp is RAM), so
    a route for large inputs sizes its template's root volume; others keep the image's size.
    """
    chosen = {}
    for route in routes:
        if "root_volume_gib" not in route:
            continue
        name, wanted = route["launch_template"], route["root_volume_gib"]
        have, source = chosen.setdefault(name, (wanted, route["name"]))
        if have != wanted:
            raise DeployError(f"route {route['name']!r} wants launch template {name} with a "
                              f"{wanted} GiB root volume, but route {source!r} wants {have} GiB; "
                              "give the route its own launch_template")
    return {name: size for name, (size, _) in chosen.items()}


def uses_spot(spot, routes):
    """True when workers may launch as spot: deploy's --spot, or a route's "spot": true (pure).

    Spot needs what on-demand launches do not: EC2's service-linked role for spot, which
    deploy makes, and the deployer's RunInstances on a spot-instances-request (reconcile).
    """
    return bool(spot) or any(route.get("spot") for route in routes)


def check_routing_table(routes_file, default_template, default_type):
    """Return (routes, {launch template: instance type}) of a routing table file; DeployError names the file and problem."""
    routes = load_routes_file(routes_file)
    try:
        return routes, template_instance_types(routes, default_template, default_type)
    except DeployError as err:
        raise DeployError(f"routing table {routes_file}: {err}") from None


def routes_by_template(routes, default_template):
    """Return {launch template: [route names]}; the worker template also serves unmatched keys (pure)."""
    found = {default_template: ["default"]}
    for route in routes:
        found.setdefault(route["launch_template"], []).append(route["name"])
    return found


def load_routes_or_none(routes_file):
    """Return the routing table's routes, or [] when it is invalid (status reports that as drift)."""
    try:
        return load_routes_file(routes_file)
    except DeployError:
        return []
