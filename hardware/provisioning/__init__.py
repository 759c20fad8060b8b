"""Ansible playbooks and the templates shared by provisioning and flashing (package data)."""
