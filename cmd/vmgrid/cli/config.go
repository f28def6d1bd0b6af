package cli

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"sigs.k8s.io/yaml"
)

// The client config file: named grids (contexts) and the current one, the
// way kubectl's kubeconfig and incus's remotes keep them. A client verb
// takes each setting from, first to last: its flag, its environment
// variable, the context, the built-in default.

// clientConfig is $XDG_CONFIG_HOME/vmgrid/config.yaml.
type clientConfig struct {
	Current  string                    `json:"current-context"`
	Contexts map[string]*clientContext `json:"contexts"`
}

// clientContext is one grid as a client reaches it.
type clientContext struct {
	Shop           string   `json:"shop,omitempty"`
	ImageServer    string   `json:"image-server,omitempty"`
	DataServer     string   `json:"data-server,omitempty"`
	ComputeServers []string `json:"compute-servers,omitempty"`
	Token          string   `json:"token,omitempty"`
	OperatorToken  string   `json:"operator-token,omitempty"`
	TLSCA          string   `json:"tls-ca,omitempty"`
	TLSCert        string   `json:"tls-cert,omitempty"`
	TLSKey         string   `json:"tls-key,omitempty"`
}

// defaultConfigPath is $VMGRID_CONFIG, else vmgrid/config.yaml under
// $XDG_CONFIG_HOME (default ~/.config).
func defaultConfigPath() string {
	if p := os.Getenv("VMGRID_CONFIG"); p != "" {
		return p
	}
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "vmgrid", "config.yaml")
}

// loadConfig reads path; a missing file is an empty config.
func loadConfig(path string) (*clientConfig, error) {
	c := &clientConfig{Contexts: map[string]*clientContext{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, err
	}
	if err := yaml.UnmarshalStrict(b, c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if c.Contexts == nil {
		c.Contexts = map[string]*clientContext{}
	}
	return c, nil
}

// save writes the config readable by its owner only: it holds tokens.
func (c *clientConfig) save(path string) error {
	b, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// get returns the context called name.
func (c *clientConfig) get(name string) (*clientContext, error) {
	cx, ok := c.Contexts[name]
	if !ok {
		return nil, fmt.Errorf("no context %q (vmgrid context ls lists them)", name)
	}
	return cx, nil
}

// names returns the contexts' names in order.
func (c *clientConfig) names() []string {
	var ns []string
	for n := range c.Contexts {
		ns = append(ns, n)
	}
	slices.Sort(ns)
	return ns
}

// configPath is --config, else $VMGRID_CONFIG, else the XDG default.
func (g *globals) configPath() string {
	if g.config != "" {
		return g.config
	}
	return defaultConfigPath()
}

// clientContext returns the context client verbs use: --context, else the
// current one; an empty one when there is none (no config file yet).
func (g *globals) clientContext() (*clientContext, error) {
	if g.cx != nil {
		return g.cx, nil
	}
	c, err := loadConfig(g.configPath())
	if err != nil {
		return nil, err
	}
	name := g.contextName
	if name == "" {
		name = c.Current
	}
	g.cx = &clientContext{}
	if name != "" {
		if g.cx, err = c.get(name); err != nil {
			return nil, err
		}
	}
	return g.cx, nil
}
