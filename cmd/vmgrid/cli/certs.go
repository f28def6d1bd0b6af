package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/services/pki"
)

func certsCmd(*globals) *cobra.Command {
	var dir string
	var hosts []string
	c := &cobra.Command{
		Use:   "certs NAME...",
		Short: "Make a CA and a mutual-TLS certificate for each named service",
		Long: `Make, in --dir, a certificate authority (ca.pem, ca-key.pem) when there is
none, and for each NAME a certificate NAME.pem with its key NAME-key.pem,
valid as a server and as a client for --hosts and NAME itself, with NAME as
its CommonName. Existing files are kept: run it again with more names to
add services. This is what vmgrid up does in DIR/pki.

For a deployed grid, e.g.:
  vmgrid certs --dir /etc/vmgrid/pki --hosts grid1.example,10.0.0.5 \
    etcd root shop imageserver dataserver plant1 plant2 client
then give each role its files (--tls-cert NAME.pem --tls-key NAME-key.pem
--tls-ca ca.pem), the shop and plants the same as --etcd-cert/--etcd-key/
--etcd-cacert, and vmgrid etcd --users shop,plant1,plant2 --root-cert
root.pem --root-key root-key.pem. Keep ca-key.pem off the servers.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, names []string) error {
			if dir == "" {
				return errors.New("--dir is required")
			}
			d := pki.Dir(dir)
			if err := pki.Ensure(d, hosts, names...); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA %s\n", d.CA())
			for _, n := range names {
				f := d.TLS(n)
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %s %s\n", n, f.CertFile, f.KeyFile)
			}
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "directory of the CA and certificates (made 0700)")
	c.Flags().StringSliceVar(&hosts, "hosts", []string{"127.0.0.1", "localhost"}, "DNS names and IP addresses the certificates are valid for, comma separated")
	return c
}
