// Entra access tokens for the gateway's scope from Azure.Identity (the .NET build only: Mono's build
// leaves this file out). DefaultAzureCredential tries environment, workload and managed identity,
// then developer sign-ins (Azure CLI, Visual Studio), so the same binary runs on a laptop and in Azure.
using System;
using System.Threading;
using System.Threading.Tasks;
using Azure.Core;
using Azure.Identity;

namespace Gateway.Client
{
    public sealed class AzureIdentityTokenSource : ITokenSource
    {
        static readonly TimeSpan RefreshMargin = TimeSpan.FromMinutes(5);
        readonly TokenCredential _credential;
        readonly TokenRequestContext _request;
        AccessToken _cached;

        public AzureIdentityTokenSource(string scope) : this(new DefaultAzureCredential(), scope) { }

        public AzureIdentityTokenSource(TokenCredential credential, string scope)
        {
            _credential = credential;
            _request = new TokenRequestContext(new[] { scope });
        }

        public async Task<string> GetTokenAsync(CancellationToken cancel)
        {
            // Not every credential in the chain caches (the Azure CLI one shells out each time).
            if (_cached.Token == null || _cached.ExpiresOn - DateTimeOffset.UtcNow < RefreshMargin)
                _cached = await _credential.GetTokenAsync(_request, cancel).ConfigureAwait(false);
            return _cached.Token;
        }
    }
}
